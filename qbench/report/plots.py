"""PNG plots: delta-ppl per scheme and model, per-layer probe curves, the first-token share
per head, and the headline matrix as a heatmap."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from qbench.report.matrix import overlaps_zero, pct, row_label, scheme_order
from qbench.report.records import REFERENCE_SCHEME
from qbench.results import ResultStore, save_figure


def write_plots(store: ResultStore, table: pd.DataFrame, out_dir: Path, records: list[dict] | None = None) -> list[Path]:
    """PNG plots: delta-ppl per scheme per model; per-layer probe curves, FP vs quantized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ok = table[(table.status == "ok") & (table.scheme != REFERENCE_SCHEME)].dropna(subset=["rel_delta_%"])
    if not ok.empty:
        pivot = ok.pivot_table(index="scheme", columns="model", values="rel_delta_%")
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(pivot) + 1.5))
        pivot.plot.barh(ax=ax)
        ax.set_xlabel("relative delta-ppl vs fp32 (%)")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title("Perplexity degradation per scheme")
        fig.tight_layout()
        path = plots_dir / "delta_ppl.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    probes = [r for r in (store.records() if records is None else records) if r["task"] == "probes" and r.get("status") == "ok"
              and "kurtosis_per_layer" in (r.get("metrics") or {})]
    for model in sorted({r["model"] for r in probes}):
        mine = [r for r in probes if r["model"] == model]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for r in sorted(mine, key=lambda r: (r["scheme"] != REFERENCE_SCHEME, r["scheme"])):
            m = r["metrics"]
            style = {"linewidth": 2.5 if r["scheme"] == REFERENCE_SCHEME else 1.2, "label": r["scheme"]}
            axes[0].plot(m["kurtosis_per_layer"], **style)
            axes[1].plot(m["max_inf_norm_per_layer"], **style)
            axes[2].plot(m["first_token_share_per_layer"], **style)
        for ax, title in zip(axes, ["kurtosis (max over sites)", "max inf-norm", "first-token attention share"]):
            ax.set_title(title)
            ax.set_xlabel("layer")
        axes[2].legend(fontsize=7)
        fig.suptitle(f"{model}: per-layer probes, fp32 vs quantized")
        fig.tight_layout()
        path = plots_dir / f"probes_{re.sub(r'[^A-Za-z0-9_.-]+', '_', model).strip('_')}.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    fp = [r for r in probes if r["scheme"] == REFERENCE_SCHEME]
    if fp:
        fig, axes = plt.subplots(1, len(fp), figsize=(3.2 * len(fp), 3.2), squeeze=False)
        for ax, r in zip(axes[0], fp):
            share = r["metrics"]["first_token_share_per_head"]
            image = ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(r["model"])
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="attention on token 0")
        path = plots_dir / "first_token_share.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def write_heatmap(cells: pd.DataFrame, path: Path) -> Path | None:
    """The matrix as a heatmap, colour symmetric in log space (SymLogNorm), annotated."""
    if cells.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import SymLogNorm

    schemes = scheme_order(cells)
    rows = list(dict.fromkeys(zip(cells.family, cells.arm, cells.variant)))
    grid = np.full((len(rows), len(schemes)), np.nan)
    marks = np.zeros_like(grid, dtype=bool)
    for c in cells.to_dict("records"):
        i, j = rows.index((c["family"], c["arm"], c["variant"])), schemes.index(c["scheme"])
        grid[i, j], marks[i, j] = c["mean"], overlaps_zero(c)
    bound = max(float(np.nanmax(np.abs(grid))), 1.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(schemes), 1.2 + 0.38 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", aspect="auto",
                      norm=SymLogNorm(linthresh=0.1, linscale=0.5, vmin=-bound, vmax=bound, base=10))
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(len(schemes)), schemes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [row_label(*r) for r in rows], fontsize=8)
    for i in range(len(rows)):
        for j in range(len(schemes)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, ("~" if marks[i, j] else "") + pct(grid[i, j]), ha="center", va="center",
                        fontsize=6.5, color="white" if abs(grid[i, j]) > bound ** 0.6 else "black")
    fig.colorbar(image, ax=ax, label="relative delta-ppl vs fp32 (%), symmetric log scale")
    ax.set_title("qbench: perplexity change per model and scheme (~: range includes 0)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path
