"""Where qbench finds its zoo and keeps its caches."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


def models_dir() -> Path:
    """The zoo: $QBENCH_MODELS, else the repository's models/ folder."""
    return Path(os.environ.get("QBENCH_MODELS", REPO_ROOT / "models"))


def cache_dir() -> Path:
    """Derived data (tokenizers, encoded splits, FP logits): $QBENCH_CACHE or ~/.cache/qbench."""
    path = Path(os.environ.get("QBENCH_CACHE", Path.home() / ".cache" / "qbench"))
    path.mkdir(parents=True, exist_ok=True)
    return path
