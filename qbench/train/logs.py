"""A run's CSV logs: the loss log and, for Bigram-Backcopy runs, the mechanism log (Attn_s,
Val_s, Delta-logit_s per layer); both cut back to a resumed step."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from qbench.resumable import truncate_log

LOG_FILE = "train_log.csv"
MECHANISM_FILE = "mechanism_log.csv"
MECHANISM_EVERY = 50
MECHANISM_FIELDS = ["step", "attn_s", "delta_logit_s", "val_s", "val_s_ratio", "val_s_eff", "val_s_eff_ratio",
                    "gate_bos", "gate_others"]
MECHANISM_LAYER_FIELDS = ["attn_s", "delta_logit_s", "val_s_ratio", "val_s_eff_ratio", "gate_bos"]


class MechanismLog:
    """Attn_s, Val_s and Delta-logit_s (qbench.probes.mechanism) on 64 fixed sequences,
    logged every MECHANISM_EVERY steps of a Bigram-Backcopy run."""

    def __init__(self, data, path: Path, step: int):
        self.task, self.path = data.task, path
        self.tokens = data.task.sample(64, data.preset.context, torch.Generator().manual_seed(4321))
        # the layer average (as before), then every layer's own values
        self.fields = MECHANISM_FIELDS + [f"{k}_l{i}" for i in range(data.preset.n_layer) for k in MECHANISM_LAYER_FIELDS]
        if step == 0 or not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        else:
            truncate_log(path, step)
            rows = list(csv.reader(open(path)))
            if rows and rows[0] != self.fields:  # a log from before per-layer columns: widen it
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows([self.fields] + [r + [""] * (len(self.fields) - len(r)) for r in rows[1:]])

    def log(self, model, step: int) -> None:
        from qbench.probes.mechanism import bb_mechanism

        m = bb_mechanism(model, self.tokens, self.task.is_trigger)
        for row in m["per_layer"]:
            m.update({f"{k}_l{row['layer']}": v for k, v in row.items() if k != "layer"})
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([step] + [f"{m[k]:.6g}" if k in m else "" for k in self.fields[1:]])
