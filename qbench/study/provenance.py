"""How each checkpoint was trained, for the headline's caption: the device, the training
precision (autocast), the dtype its weights are stored in, and the passes over the training
split.  Read from the checkpoint folders (model card, safetensors header), never typed."""
from __future__ import annotations

import json
import re
import struct
from functools import lru_cache
from pathlib import Path

import pandas as pd

WALL = re.compile(r"\| wall time \| [\d.,]+ s on (?P<where>[^|]+?) \|")
AUTOCAST = re.compile(r"training autocast: (?P<autocast>\w+)")
TOKENS = re.compile(r"\| training tokens \| (?P<tokens>[\d,]+) \|")
DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def stored_dtype(weights: Path) -> str | None:
    """The dtype of the first tensor in a safetensors header (8-byte length, then JSON)."""
    try:
        with weights.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 1 << 24:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    dtypes = {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    return "/".join(sorted(DTYPES.get(d, str(d)) for d in dtypes)) or None


def card_facts(folder: Path) -> dict:
    """device, autocast, stored dtype and training tokens of one checkpoint folder."""
    card = (folder / "README.md").read_text() if (folder / "README.md").exists() else ""
    where = WALL.search(card)
    device = "-"
    if where:
        text = where["where"]
        gpu = re.search(r"NVIDIA (\S+)", text)
        device = gpu[1] if gpu else "CPU"
    autocast = AUTOCAST.search(card)
    tokens = TOKENS.search(card)
    return {"device": device, "autocast": autocast["autocast"] if autocast else "none",
            "stored": stored_dtype(folder / "model.safetensors") or "-",
            "tokens": int(tokens["tokens"].replace(",", "")) if tokens else None}


@lru_cache(maxsize=None)
def train_split_tokens(corpus: str = "sotu", vocab_size: int = 4096) -> int:
    """Tokens of the corpus' training split under the zoo's tokenizer (cached on disk)."""
    from qbench.data import load_corpus
    from qbench.data.tokenizer import cached_bpe_tokenizer
    from qbench.data.tokens import cached_split_ids

    data = load_corpus(corpus)
    tokenizer = cached_bpe_tokenizer(data.train, vocab_size, data.split_hash("train"))
    return int(len(cached_split_ids(data, "train", tokenizer)))


def provenance_table(models_dir: Path, groups: dict[str, list[tuple[str, str, int]]]) -> pd.DataFrame:
    """One row per (group, device, precision, stored dtype, epochs): which arms and seeds.
    `groups`: group -> [(model, arm, seed)]."""
    rows = {}
    split = None
    for group, members in groups.items():
        for model, arm, seed in members:
            folder = Path(models_dir) / model
            if not folder.exists():
                continue
            facts = card_facts(folder)
            if facts["tokens"] and split is None:
                split = train_split_tokens()
            epochs = f"{facts['tokens'] / split:.1f}" if facts["tokens"] and split else "-"
            key = (group, facts["device"], "fp32" if facts["autocast"] == "none" else facts["autocast"] + " autocast",
                   facts["stored"], epochs)
            rows.setdefault(key, {}).setdefault(arm, []).append(seed)
    out = []
    for (group, device, precision, stored, epochs), arms in rows.items():
        who = ", ".join(f"{arm} {','.join(str(s) for s in sorted(seeds))}" for arm, seeds in arms.items())
        out.append({"group": group, "device": device, "training": precision, "stored": stored,
                    "epochs": epochs, "arms and seeds": who})
    return pd.DataFrame(out)
