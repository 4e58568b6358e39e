"""Corpora, tokenizers and token streams."""
from qbench.data.corpus import DEFAULT_CORPUS, Corpus, CorpusError, load_corpus

__all__ = ["DEFAULT_CORPUS", "Corpus", "CorpusError", "load_corpus"]
