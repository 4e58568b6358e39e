"""The Bigram-Backcopy task (Guo et al. 2024, arXiv 2410.13835).

Tokens follow a bigram distribution estimated from real character-level text, except
that right after a trigger token the next token copies the token before the trigger.
Every sequence starts with BOS.  The k triggers are the k most frequent characters.
"""
from __future__ import annotations

import functools
from collections import Counter

import torch

from qbench.data.tokenizer import character_tokenizer

BOS_ID = 1
FIRST_CHAR_ID = 3  # ids 0-2 are <pad>, <s>, </s>


class BigramBackcopy:
    def __init__(self, text: str, n_chars: int = 48, n_triggers: int = 3, smoothing: float = 1e-3):
        text = text.lower()
        counts = Counter(text)
        self.chars = [c for c, _ in counts.most_common(n_chars)]
        self.tokenizer = character_tokenizer(self.chars)
        self.vocab_size = len(self.tokenizer)
        index = {c: FIRST_CHAR_ID + i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in text if c in index], dtype=torch.long)
        v = self.vocab_size
        bigram = torch.zeros(v, v, dtype=torch.float64)
        bigram.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.float64), accumulate=True)
        char_slice = slice(FIRST_CHAR_ID, FIRST_CHAR_ID + len(self.chars))
        bigram[char_slice, char_slice] += smoothing
        rows = bigram.sum(dim=1, keepdim=True)
        self.bigram = torch.where(rows > 0, bigram / rows.clamp_min(1e-12), 0.0)  # (V, V)
        self.triggers = torch.tensor([FIRST_CHAR_ID + i for i in range(n_triggers)])  # most frequent
        unigram = torch.zeros(v, dtype=torch.float64)
        unigram[char_slice] = torch.bincount(ids, minlength=v)[char_slice].double()
        unigram[self.triggers] = 0.0  # position 1 has no token before it to copy
        self.first = unigram / unigram.sum()

    def is_trigger(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.isin(tokens, self.triggers)

    def sample(self, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(B, length) sequences: BOS, a first token, then bigram or back-copy steps."""
        seq = torch.empty(batch_size, length, dtype=torch.long)
        seq[:, 0] = BOS_ID
        seq[:, 1] = torch.multinomial(self.first.expand(batch_size, -1), 1, generator=generator)[:, 0]
        for i in range(2, length):
            prev = seq[:, i - 1]
            drawn = torch.multinomial(self.bigram[prev], 1, generator=generator)[:, 0]
            seq[:, i] = torch.where(self.is_trigger(prev), seq[:, i - 2], drawn)
        return seq

    def sample_inverse_cdf(self, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """`sample`'s distribution drawn by inverse CDF from uniforms drawn up front: the same
        sequences in law, another random stream, ~30x faster (multinomial per position
        dominated a GPU step: REFERENCE.md section 7's 8.3 steps/s was this loop)."""
        if not hasattr(self, "_cdf"):
            self._cdf = self.bigram.cumsum(dim=1)  # (V, V)
            self._cdf[:, -1] = torch.where(self.bigram.sum(dim=1) > 0, 2.0, self._cdf[:, -1])  # no u escapes
            self._first_cdf = self.first.cumsum(dim=0)
            self._first_cdf[-1] = 2.0
        u = torch.rand(length, batch_size, dtype=torch.float64, generator=generator)  # (T, B)
        seq = torch.empty(batch_size, length, dtype=torch.long)
        seq[:, 0] = BOS_ID
        seq[:, 1] = torch.searchsorted(self._first_cdf, u[1], right=True)
        for i in range(2, length):
            prev = seq[:, i - 1]
            drawn = torch.searchsorted(self._cdf[prev], u[i].unsqueeze(1), right=True)[:, 0]
            seq[:, i] = torch.where(self.is_trigger(prev), seq[:, i - 2], drawn)
        return seq


@functools.lru_cache(maxsize=4)
def for_corpus(corpus_spec: str) -> BigramBackcopy:
    """The task whose bigram statistics come from the corpus' training split, built once per
    process (evaluation, calibration and the mechanism probes share it)."""
    from qbench.data.corpus import load_corpus

    return BigramBackcopy("".join(load_corpus(corpus_spec).train))
