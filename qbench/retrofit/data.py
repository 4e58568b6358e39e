"""The retrofit's training data: BOS-prefixed random windows in the base's tokenizer."""
from __future__ import annotations

import torch


class RetrofitData:
    """BOS-prefixed random windows of the corpus's training split, in the base's tokenizer;
    the first token is the perplexity protocol's (so training sees what evaluation sees)."""

    def __init__(self, tokenizer, corpus_spec: str, context: int, batch_size: int):
        from qbench.data import load_corpus
        from qbench.data.tokens import cached_split_ids
        from qbench.eval.perplexity import _bos_id

        corpus = load_corpus(corpus_spec)
        self.ids = cached_split_ids(corpus, "train", tokenizer)
        self.bos = _bos_id(tokenizer)
        self.context, self.batch_size = context, batch_size
        self.info = {"corpus": corpus_spec, "split": "train", "hashes": {"train": corpus.split_hash("train")},
                     "train_tokens": int(len(self.ids)), "first_token_id": self.bos}

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        from qbench.data.tokens import random_windows

        return random_windows(self.ids, self.batch_size, self.context, self.bos, generator)
