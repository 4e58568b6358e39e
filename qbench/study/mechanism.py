"""Part 1 of the study: the Bigram-Backcopy mechanism curves logged while the `bb`
checkpoints trained, and the copy circuit under quantization."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from qbench.study.plan import BB_ARMS
from qbench.study.tables import mean_std as _mean_std
from qbench.zoo import read_zoo

def mechanism_logs(models_dir: Path, preset: str = "bb") -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """arm -> [(checkpoint, log frame)] for every checkpoint of `preset` with a mechanism log."""
    zoo = read_zoo()
    logs: dict[str, list] = {}
    for name, entry in zoo.items():
        folder = models_dir / str(entry.get("path", name))
        path = folder / "mechanism_log.csv"
        if entry.get("preset") == preset and path.exists():
            logs.setdefault(entry["arm"], []).append((name, pd.read_csv(path)))
    return logs


def _logged_layers(column_sets) -> list[int]:
    """The layer indices of a mechanism log's per-layer columns (`attn_s_l<i>`)."""
    return sorted({int(c.rsplit("_l", 1)[1]) for columns in column_sets for c in columns if c.startswith("attn_s_l")})


def mechanism_table(logs) -> pd.DataFrame:
    rows = []
    for arm in sorted(logs, key=lambda a: BB_ARMS.index(a) if a in BB_ARMS else 99):
        finals = [frame.iloc[-1] for _, frame in logs[arm]]
        row = {"arm": arm, "seeds": len(finals), "step": int(finals[0]["step"])}
        for column in ("attn_s", "val_s", "val_s_ratio", "val_s_eff_ratio", "delta_logit_s", "gate_bos", "gate_others"):
            row[column] = _mean_std([f.get(column) for f in finals])
        # multi-layer models: the top-level columns are layer 0; the sink can form in any
        # layer, so every layer's Attn_s and value ratio (mean over seeds) follow
        layers = _logged_layers(f.index for f in finals)
        if len(layers) > 1:
            for column in ("attn_s", "val_s_ratio"):
                row[f"{column} by layer"] = " / ".join(
                    _mean_std([f.get(f"{column}_l{i}") for f in finals], 2).split(" ±")[0] for i in layers)
        rows.append(row)
    return pd.DataFrame(rows)


def mechanism_plot(logs, out: Path) -> Path | None:
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("attn_s", "Attn_s: attention on BOS (non-trigger queries)"),
              ("val_s_ratio", "Val_s: ||V_BOS|| / mean ||V_j||"),
              ("val_s_eff_ratio", "gated value ||g V_BOS|| / mean (vga)"),
              ("delta_logit_s", "Delta-logit_s: BOS score - mean score")]
    # one row of panels per layer for deeper models (their `<metric>_l<i>` columns)
    layers = _logged_layers(f.columns for runs in logs.values() for _, f in runs)
    suffixes = [f"_l{i}" for i in layers] if len(layers) > 1 else [""]
    fig, grid = plt.subplots(len(suffixes), len(panels), figsize=(4.2 * len(panels), 3.4 * len(suffixes)),
                             squeeze=False)
    colors = {arm: f"C{i}" for i, arm in enumerate(sorted(logs, key=lambda a: (a not in BB_ARMS, BB_ARMS.index(a)
                                                                                if a in BB_ARMS else 0, a)))}
    cells = [(ax, column + suffix, title + (f" [layer {suffix[2:]}]" if suffix else ""))
             for axes, suffix in zip(grid, suffixes) for ax, (column, title) in zip(axes, panels)]
    for ax, column, title in cells:
        for arm, runs in logs.items():
            frames = [f for _, f in runs if column in f and f[column].notna().any()]
            if not frames:
                continue
            joined = pd.concat([f.set_index("step")[column] for f in frames], axis=1)
            line = ax.plot(joined.index, joined.mean(axis=1), label=f"{arm} (n={len(frames)})", color=colors[arm])[0]
            if len(frames) > 1:
                ax.fill_between(joined.index, joined.min(axis=1), joined.max(axis=1), alpha=0.2,
                                color=line.get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        if column.startswith(("val_s_ratio", "val_s_eff_ratio")) and ax.lines:
            ax.set_yscale("log")
    grid[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out



def bb_records_frame(records: list[dict], models: list[str]) -> pd.DataFrame:
    """One row per BB ppl record of `models`: the copy-circuit and bigram metrics, the
    sink indicators and the largest residual peak over layers."""
    rows = []
    for r in records:
        if r.get("task") != "ppl" or r.get("model") not in models or r.get("status") != "ok":
            continue
        m = r["metrics"]
        if m.get("copy_acc") is None:
            continue
        mech = m.get("mechanism") or {}
        per_layer = [x.get("attn_s") for x in m.get("mechanism_per_layer") or [] if x.get("attn_s") is not None]
        peaks = m.get("residual_peak_per_layer") or []
        rows.append({"model": r["model"], "scheme": r["scheme"], "draw": r.get("calibration_seed"),
                     "ppl": m["ppl"], "copy_acc": m["copy_acc"], "copy_loss": m["copy_loss"],
                     "bigram_acc": m["bigram_acc"], "bigram_loss": m["bigram_loss"],
                     "copy_positions": m.get("copy_positions"),
                     "attn_s": max(per_layer) if per_layer else mech.get("attn_s"),  # the sink's layer
                     "residual_peak": max(peaks) if peaks else None})
    return pd.DataFrame(rows)


def bb_quant_tables(records: list[dict], models: list[str], schemes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per arm x scheme: copy/bigram deltas against each checkpoint's fp32, mean ± std over
    training seeds of the per-checkpoint mean over calibration draws;
    per checkpoint: fp32 residual peak and sink (attn_s) beside its worst copy-accuracy drop)."""
    frame = bb_records_frame(records, models)
    if frame.empty or "fp32" not in set(frame.scheme):
        return pd.DataFrame(), pd.DataFrame()
    zoo = read_zoo()
    frame = frame.assign(draw=1)  # one row per record: the sum counts the calibration draws
    per = frame.groupby(["model", "scheme"], as_index=False).agg(
        {c: "mean" for c in ("ppl", "copy_acc", "copy_loss", "bigram_acc", "bigram_loss", "attn_s",
                             "residual_peak")} | {"draw": "sum"})
    fp = per[per.scheme == "fp32"].set_index("model")
    per = per[per.model.isin(fp.index)]
    for column in ("copy_acc", "copy_loss", "bigram_loss", "ppl"):
        per[f"d_{column}"] = [v - fp.loc[m, column] for m, v in zip(per.model, per[column])]
    per["arm"] = [zoo.get(m, {}).get("arm", m) for m in per.model]
    rows = []
    order = {s: i for i, s in enumerate(schemes)}
    for (arm, scheme), group in per[per.scheme.isin(schemes)].groupby(["arm", "scheme"]):
        rows.append({"arm": arm, "scheme": scheme, "n_seeds": group.model.nunique(), "n_draws": int(group.draw.max()),
                     "copy_acc": _mean_std(list(group.copy_acc), 4),
                     "Δcopy_acc": _mean_std(list(group.d_copy_acc), 2),
                     "Δcopy_loss": _mean_std(list(group.d_copy_loss), 2),
                     "Δbigram_loss": _mean_std(list(group.d_bigram_loss), 2),
                     "sink attn_s": _mean_std(list(group.attn_s), 3),
                     "residual peak": _mean_std(list(group.residual_peak), 3)})
    by_arm = pd.DataFrame(rows)
    if not by_arm.empty:
        by_arm = by_arm.sort_values(["scheme", "arm"], key=lambda c: c.map(order) if c.name == "scheme" else c)
    quant = per[per.scheme != "fp32"]
    worst = quant.groupby("model").agg(worst_d_copy_acc=("d_copy_acc", "min"),
                                       worst_scheme=("d_copy_acc", lambda v: quant.loc[v.idxmin(), "scheme"]))
    checkpoints = pd.DataFrame({"checkpoint": fp.index, "arm": [zoo.get(m, {}).get("arm", m) for m in fp.index],
                                "fp32 copy_acc": fp.copy_acc.round(4).values,
                                "fp32 sink attn_s": fp.attn_s.round(3).values,
                                "fp32 residual peak": fp.residual_peak.round(2).values})
    checkpoints = checkpoints.merge(worst, left_on="checkpoint", right_index=True, how="left")
    checkpoints.loc[checkpoints.worst_d_copy_acc >= 0, "worst_scheme"] = "- (no drop)"
    return by_arm, checkpoints.sort_values(["arm", "checkpoint"])

