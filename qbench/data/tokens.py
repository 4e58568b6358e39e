"""Token streams of a corpus split, and BOS-prefixed training windows."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from qbench.data.corpus import Corpus
from qbench.paths import cache_dir

DOCUMENT_SEPARATOR = "\n\n"


def split_text(corpus: Corpus, split: str, max_chars: int | None = None) -> str:
    """The split's documents joined by a blank line; optionally cut at a whitespace
    boundary after at most max_chars characters (the same text for every tokenizer)."""
    text = DOCUMENT_SEPARATOR.join(corpus.split(split))
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        text = text[: cut if cut > 0 else max_chars]
    return text


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """Token ids without special tokens (BOS is added per window). Encoded in ~1 MB pieces
    cut at blank lines, so a long split neither stalls nor spikes memory."""
    pieces, start, step = [], 0, 1_000_000
    while start < len(text):
        end = text.find(DOCUMENT_SEPARATOR, start + step)
        end = len(text) if end < 0 else end
        pieces.append(text[start:end])
        start = end
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    return np.fromiter((i for chunk in ids for i in chunk), dtype=np.int32)


def cached_split_ids(corpus: Corpus, split: str, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The split's token ids, cached under $QBENCH_CACHE/tokens/.  The cache heals: an entry
    that fails to read (truncated, a FIFO, a link to /dev/zero, a forged header, another
    dtype; qbench.safefile.load_npy) is encoded again and replaced once, never raised as
    the cell's failure; a cache that cannot be written only costs the re-encoding."""
    import logging
    import os

    from qbench.safefile import load_npy

    key = f"{corpus.split_hash(split)[:16]}-{tokenizer_hash(tokenizer)[:16]}"
    path = cache_dir() / "tokens" / f"{key}.npy"
    if os.path.lexists(path):
        try:
            ids = load_npy(path, dtype=np.int32)
            if ids.ndim == 1:
                return ids
            why = f"shape {ids.shape}, not one stream"
        except (OSError, ValueError, EOFError) as err:
            why = str(err)
        logging.getLogger(__name__).warning("token cache %s unreadable (%s); encoding again", path.name,
                                            " ".join(why.split())[:200])
    ids = encode_text(tokenizer, split_text(corpus, split))
    from qbench.atomic import atomic_save_npy

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, ids)
    except OSError as err:  # a folder where the entry belongs, a read-only cache: use the ids anyway
        logging.getLogger(__name__).warning("token cache %s not written (%s)", path.name, err)
    return ids


def random_windows(ids: np.ndarray, batch_size: int, context: int, bos_id: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(B, context) windows: BOS, then context-1 consecutive tokens from a random offset."""
    n = context - 1
    if len(ids) <= n:
        raise ValueError(f"split has {len(ids)} tokens, fewer than one window of {n}")
    starts = torch.randint(0, len(ids) - n, (batch_size,), generator=generator)
    stream = torch.from_numpy(ids.astype(np.int64))
    body = torch.stack([stream[s: s + n] for s in starts.tolist()])
    return torch.cat([torch.full((batch_size, 1), bos_id, dtype=torch.long), body], dim=1)


def first_token_id(tokenizer) -> int | None:
    """The token every evaluated or calibration window starts with (where sinks form):
    the tokenizer's BOS, else its EOS (GPT-2-style tokenizers have only `<|endoftext|>`),
    else None."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None
