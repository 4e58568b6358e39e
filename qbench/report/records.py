"""Loading and selecting records: the long frame, checkpoint labels, --models/--schemes."""
from __future__ import annotations

import pandas as pd

REFERENCE_SCHEME = "fp32"


class EmptyReportError(ValueError):
    """Nothing to compare: the store holds no records, or none besides fp32."""


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record; a record listed twice (the same key: a model or seed given
    twice) counts once, so n is the number of distinct cells."""
    rows, seen = [], set()
    for r in records:
        if r.get("key") is not None:
            if r["key"] in seen:
                continue
            seen.add(r["key"])
        metrics = r.get("metrics") or {}
        rows.append({
            "model": r["model"], "scheme": r["scheme"], "task": r["task"], "protocol": r["protocol"],
            "status": r.get("status"), "ppl": metrics.get("ppl"), "word_ppl": metrics.get("word_ppl"),
            "byte_ppl": metrics.get("byte_ppl"), "tokens": metrics.get("tokens"), "error": r.get("error"),
            "kl": metrics.get("kl", 0.0 if r["scheme"] == REFERENCE_SCHEME else None),
            "top1_agreement": metrics.get("top1_agreement", 1.0 if r["scheme"] == REFERENCE_SCHEME else None),
        })
    return pd.DataFrame(rows)


def label_checkpoints(records: list[dict], zoo: dict) -> list[dict]:
    """Records whose checkpoint differs from the one the zoo lists under their model name
    (a corrupted or retrained checkpoint) get the model name `name@<short hash>`, so reports
    never average different checkpoints; outside the zoo, a name seen with several
    checkpoints is split the same way.  `zoo`: the zoo's entries by name, from the caller."""
    hashes: dict[str, set] = {}
    for r in records:
        hashes.setdefault(r["model"], set()).add(_checkpoint(r))
    out = []
    for r in records:
        name, digest = r["model"], _checkpoint(r)
        listed = (zoo.get(name) or {}).get("checkpoint_hash")
        changed = digest != listed if listed else len(hashes[name]) > 1
        out.append({**r, "model": f"{name}@{str(digest)[:8]}"} if digest and changed else r)
    return out


def _checkpoint(record: dict):
    model = (record.get("config") or {}).get("model")
    return model.get("checkpoint_hash") if isinstance(model, dict) else None


def select_records(records: list[dict], models: str | None = None, schemes: list[str] | None = None) -> list[dict]:
    """`models`: comma-separated globs on model names; `schemes`: names (fp32 is always kept,
    every comparison needs it)."""
    import fnmatch

    patterns = [p.strip() for p in (models or "").split(",") if p.strip()]
    keep = []
    for r in records:
        if patterns and not any(fnmatch.fnmatchcase(r["model"], p) for p in patterns):
            continue
        if schemes and r["scheme"] not in schemes and r["scheme"] != REFERENCE_SCHEME:
            continue
        keep.append(r)
    return keep
