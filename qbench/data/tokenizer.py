"""Byte-level BPE trained on a corpus' training split, wrapped for transformers."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qbench.paths import cache_dir

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: pad, BOS, EOS


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="right",
    )


def _with_bos(tokenizer: Tokenizer) -> Tokenizer:
    bos = tokenizer.token_to_id("<s>")
    # Every encoded sequence starts with BOS, as the models were trained.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return tokenizer


def train_bpe_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Deterministic byte-level BPE with <pad>, <s> (BOS) and </s> (EOS)."""
    if not 256 + len(SPECIAL_TOKENS) < vocab_size <= 8192:
        raise ValueError(f"vocab_size must lie in (259, 8192], got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return _wrap(_with_bos(tokenizer))


def character_tokenizer(characters: list[str]) -> PreTrainedTokenizerFast:
    """One token per character (Bigram-Backcopy); ids 0-2 are the special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in characters:
        vocab.setdefault(ch, len(vocab))
    vocab["<unk>"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    wrapped = _wrap(_with_bos(tokenizer))
    wrapped.unk_token = "<unk>"
    return wrapped


def cached_bpe_tokenizer(documents: list[str], vocab_size: int, data_hash: str) -> PreTrainedTokenizerFast:
    """Train once per (training split, vocab size); later calls load the saved files."""
    folder: Path = cache_dir() / "tokenizers" / f"{data_hash[:16]}-v{vocab_size}"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer = train_bpe_tokenizer(documents, vocab_size)
    # saved beside, then renamed into place: a trainer sharing the cache never loads a folder
    # that is still being written (tokenizer.json there, tokenizer_config.json not yet)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(staging)
        if folder.exists() and not (folder / "tokenizer.json").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a partial folder left by an older version
        try:
            staging.rename(folder)
        except OSError:  # another process put the same tokenizer (same data, same size) there first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
