"""Calibration batches: BOS-prefixed windows drawn with a seed from the training split of
the corpus an evaluation protocol uses (never from the held-out text)."""
from __future__ import annotations

import torch

from qbench.data.corpus import load_corpus
from qbench.data.tokens import cached_split_ids, first_token_id, random_windows


def calibration_source(corpus_spec: str, tokenizer, window: int, bigram_backcopy: bool = False):
    """A function (n_batches, seed, batch_size) -> list of (batch_size, window) LongTensors."""
    def batches(n_batches: int, seed: int, batch_size: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        if bigram_backcopy:
            from qbench.data.bigram_backcopy import for_corpus

            task = for_corpus(corpus_spec)
            return [task.sample(batch_size, window, generator) for _ in range(n_batches)]
        ids = cached_split_ids(load_corpus(corpus_spec), "train", tokenizer)
        first = first_token_id(tokenizer)
        return [random_windows(ids, batch_size, window, first, generator) for _ in range(n_batches)]

    return batches
