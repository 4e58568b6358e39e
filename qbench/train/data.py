"""Training data streams: random BOS-prefixed corpus windows (language modelling) and
Bigram-Backcopy sequences; the fixed validation loss."""
from __future__ import annotations

import numpy as np
import torch

from qbench.data import load_corpus
from qbench.data.bigram_backcopy import BigramBackcopy
from qbench.data.tokenizer import cached_bpe_tokenizer
from qbench.data.tokens import cached_split_ids, random_windows
from qbench.train.recipes import Preset


class LMData:
    """Random BOS-prefixed windows of a corpus split."""

    def __init__(self, corpus_spec: str, preset: Preset):
        self.corpus = load_corpus(corpus_spec)
        self.tokenizer = cached_bpe_tokenizer(self.corpus.train, preset.vocab_size, self.corpus.split_hash("train"))
        self.ids = {s: cached_split_ids(self.corpus, s, self.tokenizer) for s in ("train", "validation")}
        self.preset = preset
        self.data_info = {"task": "lm", "corpus": corpus_spec, "hashes": self.corpus.hashes(),
                          "train_tokens": int(len(self.ids["train"]))}

    def batch(self, split: str, generator: torch.Generator) -> torch.Tensor:
        return random_windows(self.ids[split], self.preset.batch_size, self.preset.context,
                              self.tokenizer.bos_token_id, generator)


class BBData:
    """Bigram-Backcopy sequences; the bigram statistics come from the corpus' training split."""

    def __init__(self, corpus_spec: str, preset: Preset):
        corpus = load_corpus(corpus_spec)
        self.task = BigramBackcopy("".join(corpus.train))
        self.tokenizer = self.task.tokenizer
        self.preset = preset
        self.data_info = {"task": "bigram_backcopy", "corpus": corpus_spec,
                          "hashes": {"train": corpus.split_hash("train")},
                          "triggers": [self.task.chars[i - 3] for i in self.task.triggers.tolist()]}

    def batch(self, split: str, generator: torch.Generator) -> torch.Tensor:
        draw = self.task.sample_inverse_cdf if self.preset.sampler == "inverse_cdf" else self.task.sample
        return draw(self.preset.batch_size, self.preset.context, generator)


def make_data(preset: Preset, corpus_spec: str):
    return BBData(corpus_spec, preset) if preset.task == "bigram_backcopy" else LMData(corpus_spec, preset)


@torch.no_grad()
def validation_loss(model, data, n_batches: int = 8, seed: int = 1234) -> float:
    """Mean loss on a fixed set of validation windows (the same for every arm and step)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = [model(x.to(device), labels=x.to(device)).loss.item()
              for x in (data.batch("validation", generator) for _ in range(n_batches))]
    model.train()
    return float(np.mean(losses))
