"""The perplexity protocols a cell evaluates under: a model's protocol and the hash of the
split it reads.  Eval owns them (and the task catalogue, qbench.eval.catalogue) so that
the bench, the planner, the zoo refresh and the lm-eval adapter import eval, never the
reverse."""
from __future__ import annotations

import re
from dataclasses import dataclass

from qbench.data import load_corpus
from qbench.eval.perplexity import PerplexityProtocol
from qbench.suggest import closest

DEFAULT_WINDOW = 256

# Named perplexity protocols (`--protocol`); a trailing -N sets the window of the last two.
PROTOCOLS = {
    "default": "the model's own corpus split, non-overlapping windows of min(256, its context) tokens, BOS "
               "first, every token scored",
    "llamacpp-512": "llama.cpp's `perplexity`: context 512, BOS first, each chunk scored on its second half "
                    "(llamacpp-N: context N)",
    "lm-eval-rolling": "lm-eval's loglikelihood_rolling (its wikitext convention): each document alone, windows "
                       "of the model's context, every token scored once (lm-eval-rolling-N: N-token windows)",
}


@dataclass(frozen=True)
class ProtocolOptions:
    """What the user chose for perplexity (`--protocol`, `--window`, `--stride`,
    `--score-from`); None = the protocol's own setting."""
    name: str = "default"
    window: int | None = None
    stride: int | None = None
    score_from: int | None = None

    def kind_and_window(self) -> tuple[str, int | None]:
        match = re.fullmatch(r"(default|llamacpp|lm-eval-rolling)(?:-(\d+))?", self.name)
        if match is None or (match.group(1) == "default" and match.group(2)):
            raise ValueError(f"unknown protocol {self.name!r}{closest(self.name, list(PROTOCOLS))} "
                             f"(qbench list protocols)")
        kind = {"default": "nonoverlap", "llamacpp": "llamacpp", "lm-eval-rolling": "rolling"}[match.group(1)]
        window = int(match.group(2)) if match.group(2) else None
        return kind, self.window or window


def resolve_protocol(model, limit: int | None, corpus: str | None = None, first_token: str | None = None,
                     options: ProtocolOptions | None = None) -> PerplexityProtocol:
    """The model's own held-out data: its training corpus' test split (sotu by default),
    or fixed synthetic sequences for Bigram-Backcopy models, under the chosen protocol.
    `model`: anything with the zoo's `info` dict and either `max_positions` (a reference,
    nothing loaded) or a loaded `model` with a config.  `first_token`: the token string
    that starts every window (default: the tokenizer's BOS, else EOS).  A window longer
    than the model's context is refused here, before any weight loads."""
    training = model.info.get("training") or {}
    data = training.get("data") or {}
    if hasattr(model, "max_positions"):
        max_positions = model.max_positions or DEFAULT_WINDOW
    else:
        max_positions = getattr(model.model.config, "max_position_embeddings", DEFAULT_WINDOW) or DEFAULT_WINDOW
    options = options or ProtocolOptions()
    kind, window = options.kind_and_window()
    if data.get("task") == "bigram_backcopy":  # the zoo's training facts: a Bigram-Backcopy model
        if options != ProtocolOptions():
            raise ValueError(f"model {getattr(model, 'name', '?')} is a Bigram-Backcopy model: it is evaluated on "
                             "its fixed synthetic sequences, not under a text protocol")
        return PerplexityProtocol(kind="bigram_backcopy", corpus=data["corpus"],
                                  window=training["recipe"]["context"])
    if window is None:
        window = max_positions if kind == "rolling" else min(DEFAULT_WINDOW, max_positions)
    protocol = PerplexityProtocol(kind=kind, corpus=corpus or data.get("corpus", "sotu"), window=window,
                                  max_chars=limit, first_token=first_token, stride=options.stride,
                                  score_from=options.score_from)
    if window > max_positions:
        raise ValueError(f"protocol {protocol.id}: a {window}-token window is longer than the {max_positions} "
                         f"positions of model {getattr(model, 'name', '?')}; give --window {max_positions} or less")
    return protocol


def protocol_data_hash(protocol: PerplexityProtocol) -> str:
    corpus = load_corpus(protocol.corpus)
    return corpus.split_hash("train" if protocol.synthetic else protocol.split)
