"""The full-precision reference a quantized cell is compared against, computed once per
model and reused by every scheme.

- Next-token log-probabilities for perplexity protocols are cached on disk, one float32
  `.npy` file per evaluation batch (with the batch's token ids beside it, checked on
  every read), under `$QBENCH_CACHE/fp_logits/<key>/`, where the key hashes the
  checkpoint, the protocol and the data.  A scheme's evaluation reads one batch at a
  time: the full logits are never in memory.  A missing, corrupt, forged (a header
  declaring more than the file holds), non-regular or mismatching batch file is
  recomputed from the model and replaced, so a killed run leaves a usable partial cache
  and a damaged one heals; it is never a cell's failure.
  Size: tokens x vocabulary x 4 bytes (SmolLM2, 20,000 characters: about 0.9 GB).
- Task outputs (per-item predictions through lm-eval) are cached as JSON under
  `$QBENCH_CACHE/fp_tasks/`, keyed by checkpoint, task configuration and item limit.

`QBENCH_FP_CACHE=0` turns both caches off (the reference model then runs in lockstep).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qbench.paths import cache_dir


def _enabled() -> bool:
    return os.environ.get("QBENCH_FP_CACHE", "1") not in ("0", "false", "no")


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Unique temp name per writer: two processes filling the same cache never collide."""
    from qbench.atomic import atomic_save_npy

    atomic_save_npy(path, array)


class FPReference:
    """Wraps the full-precision model of one checkpoint."""

    def __init__(self, model: torch.nn.Module, checkpoint_hash: str):
        self.model, self.checkpoint_hash = model, checkpoint_hash
        self.computed_batches = 0  # how many batches this object had to run the model for

    # -- perplexity ---------------------------------------------------------------------
    def log_probs(self, key: str | None, index: int, x: torch.Tensor, shifted: bool = False) -> torch.Tensor:
        """log softmax of the model's next-token logits for batch `index` (B, T-1, V), the
        targets x[:, 1:]; `shifted`: the model reads x[:, :-1] (rolling windows), else x.
        The protocol is part of `key`, so the two never share a cache entry."""
        if key is None or not _enabled():
            return self._compute(x, shifted)
        folder = Path(cache_dir()) / "fp_logits" / _digest(self.checkpoint_hash, key)
        values, ids = folder / f"{index:05d}.npy", folder / f"{index:05d}.ids.npy"
        if os.path.lexists(values) and os.path.lexists(ids):
            from qbench.safefile import load_npy

            try:  # regular files only, headers checked before allocating (qbench.safefile.load_npy)
                if np.array_equal(load_npy(ids, shape=tuple(x.shape), dtype=x.numpy().dtype), x.numpy()):
                    cached = load_npy(values, dtype=np.float32)
                    if cached.ndim == 3 and cached.shape[:2] == (x.shape[0], x.shape[1] - 1):
                        return torch.from_numpy(cached)
            except (ValueError, OSError, EOFError):
                pass  # corrupt, truncated, forged or not a regular file: recompute (and replace) below
        log_p = self._compute(x, shifted)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_save(values, log_p.numpy())
            _atomic_save(ids, x.numpy())
        except OSError:  # a cache that cannot be written costs recomputation, never the cell
            pass
        return log_p

    @torch.no_grad()
    def _compute(self, x: torch.Tensor, shifted: bool = False) -> torch.Tensor:
        """On the model's device; returned on the CPU (the cache's side)."""
        from qbench.device import model_device

        self.computed_batches += 1
        self.model.eval()
        x = x.to(model_device(self.model))
        logits = self.model(input_ids=x[:, :-1]).logits.float() if shifted else \
            self.model(input_ids=x).logits[:, :-1].float()
        return F.log_softmax(logits, dim=-1).cpu()

    # -- tasks --------------------------------------------------------------------------
    def task_outputs(self, spec: dict, compute) -> dict:
        """`compute(model)` -> lm-eval outputs for the FP model, cached by `spec`."""
        if not _enabled():
            return compute(self.model)
        path = Path(cache_dir()) / "fp_tasks" / f"{_digest(self.checkpoint_hash, spec)}.json"
        if os.path.lexists(path):
            from qbench.safefile import read_text

            try:
                return json.loads(read_text(path, "cache"))
            except (ValueError, OSError, RecursionError):  # corrupt, not a regular file: recompute
                try:
                    path.unlink()
                except OSError:
                    pass
        outputs = compute(self.model)
        from qbench.atomic import atomic_write_text

        try:
            atomic_write_text(path, json.dumps(outputs), fsync=False)
        except OSError:
            pass
        return outputs
