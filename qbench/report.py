"""Records -> pandas tables (FP row and every scheme, same protocol) and REPORT.md."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from qbench.results import ResultStore

REFERENCE_SCHEME = "fp32"


def records_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        rows.append({
            "model": r["model"], "scheme": r["scheme"], "task": r["task"], "protocol": r["protocol"],
            "status": r.get("status"), "ppl": metrics.get("ppl"), "word_ppl": metrics.get("word_ppl"),
            "byte_ppl": metrics.get("byte_ppl"), "tokens": metrics.get("tokens"), "error": r.get("error"),
            "kl": metrics.get("kl", 0.0 if r["scheme"] == REFERENCE_SCHEME else None),
            "top1_agreement": metrics.get("top1_agreement", 1.0 if r["scheme"] == REFERENCE_SCHEME else None),
        })
    return pd.DataFrame(rows)


TASK_METRICS = {"accuracy": "acc", "flip_rate": "flip_rate", "recovery": "recovery"}


def task_short(task: str) -> str:
    return task.removeprefix("qbench_")


def task_frame(records: list[dict]) -> pd.DataFrame:
    """Downstream task metrics (every task that is neither ppl nor probes), one row per
    (model, scheme) with columns <task>_acc / _flip_rate / _recovery (calibration draws
    averaged).  fp32 rows carry flip_rate 0 and recovery 1 by definition."""
    rows = []
    for r in records:
        if r["task"] in ("ppl", "probes") or r.get("status") != "ok":
            continue
        metrics, short = r.get("metrics") or {}, task_short(r["task"])
        default = {"flip_rate": 0.0, "recovery": 1.0} if r["scheme"] == REFERENCE_SCHEME else {}
        rows.append({"model": r["model"], "scheme": r["scheme"], "task": short,
                     **{name: metrics.get(key, default.get(key)) for key, name in TASK_METRICS.items()}})
    if not rows:
        return pd.DataFrame(columns=["model", "scheme"])
    frame = pd.DataFrame(rows).groupby(["model", "scheme", "task"], as_index=False).mean()
    wide = frame.pivot_table(index=["model", "scheme"], columns="task", values=list(TASK_METRICS.values()),
                             dropna=False)
    tasks = sorted(frame.task.unique())
    wide.columns = [f"{task}_{metric}" for metric, task in wide.columns]
    ordered = [f"{t}_{m}" for t in tasks for m in TASK_METRICS.values() if f"{t}_{m}" in wide.columns]
    return wide[ordered].reset_index()

PROBE_COLUMNS = {"max_inf_norm": "max_inf_norm", "kurtosis_mean": "kurtosis", "sink_rate@0.3": "sink_rate@0.3",
                 "first_token_share_mean": "first_token_share"}


def probe_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (model, scheme): probe metrics, averaged over calibration draws."""
    rows = [{"model": r["model"], "scheme": r["scheme"],
             **{name: (r.get("metrics") or {}).get(key) for key, name in PROBE_COLUMNS.items()}}
            for r in records if r["task"] == "probes" and r.get("status") == "ok"]
    frame = pd.DataFrame(rows, columns=["model", "scheme", *PROBE_COLUMNS.values()])
    return frame.groupby(["model", "scheme"], as_index=False, sort=False).mean() if rows else frame


def _aggregate_draws(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of one (model, scheme, protocol) that differ only by calibration draw (or other
    seeds) become one row: the mean, with `ppl_std` and `n` (failed draws are not averaged)."""
    keys = ["model", "scheme", "protocol"]
    ok = frame[frame.status == "ok"]
    numeric = ["ppl", "word_ppl", "byte_ppl", "tokens", "kl", "top1_agreement"]
    if ok.empty:
        return frame.assign(ppl_std=None, n=0)
    means = ok.groupby(keys, sort=False)[numeric].mean()
    means["ppl_std"] = ok.groupby(keys, sort=False)["ppl"].std(ddof=1)
    means["n"] = ok.groupby(keys, sort=False)["ppl"].size()
    means["status"] = "ok"
    means = means.reset_index()
    failed = frame[(frame.status != "ok") & ~frame.set_index(keys).index.isin(means.set_index(keys).index)]
    failed = failed.drop_duplicates(keys).assign(n=0)
    return pd.concat([means, failed], ignore_index=True)


def comparison_table(records: list[dict]) -> pd.DataFrame:
    """One row per (model, protocol, scheme): ppl, delta_ppl and relative delta against the
    fp32 row measured under the same protocol."""
    frame = records_frame([r for r in records if r["task"] == "ppl"])
    if frame.empty:
        return frame
    frame = _aggregate_draws(frame)
    reference = (frame[(frame.scheme == REFERENCE_SCHEME) & (frame.status == "ok")]
                 .set_index(["model", "protocol"])["ppl"])
    frame["fp_ppl"] = [reference.get((m, p)) for m, p in zip(frame.model, frame.protocol)]
    frame["delta_ppl"] = frame.ppl - frame.fp_ppl
    frame["rel_delta_%"] = 100.0 * frame.delta_ppl / frame.fp_ppl
    columns = ["model", "scheme", "protocol", "status", "n", "ppl", "ppl_std", "delta_ppl", "rel_delta_%", "kl",
               "top1_agreement", "word_ppl", "byte_ppl", "tokens"]
    probes = probe_frame(records)
    if not probes.empty:
        frame = frame.merge(probes, on=["model", "scheme"], how="left")
        columns += list(PROBE_COLUMNS.values())
    tasks = task_frame(records)
    if len(tasks.columns) > 2:
        frame = frame.merge(tasks, on=["model", "scheme"], how="left")
        columns += [c for c in tasks.columns if c not in ("model", "scheme")]
    return frame[columns].sort_values(["model", "protocol", "scheme"], key=_fp_first).reset_index(drop=True)


def _fp_first(column: pd.Series) -> pd.Series:
    return column.map(lambda v: "" if v == REFERENCE_SCHEME else v) if column.name == "scheme" else column


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def cross_model_table(table: pd.DataFrame, scheme: str, models: list[str] | None = None) -> pd.DataFrame:
    """One scheme, models (arms) side by side: a row per model."""
    rows = table[table.scheme == scheme]
    if models:
        rows = rows[rows.model.isin(models)].set_index("model").reindex(models).reset_index()
    return rows.drop(columns=["scheme"]).reset_index(drop=True)


def write_plots(store: ResultStore, table: pd.DataFrame, out_dir: Path) -> list[Path]:
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
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    probes = [r for r in store.records() if r["task"] == "probes" and r.get("status") == "ok"
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
        fig.savefig(path, dpi=110)
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
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


COLUMN_NOTES = """Columns: `n` records averaged (calibration draws or seeds); `ppl` token perplexity under `protocol`
(the mean over the n records, `ppl_std` their sample standard deviation); `delta_ppl` = ppl - fp32 ppl (same protocol, same
run of the store); `rel_delta_%` = 100 delta / fp32; `kl` = mean KL(P_fp32 || P_quantized) of the next-token
distributions over the same tokens; `top1_agreement` = share of positions whose argmax agrees with fp32;
`word_ppl` / `byte_ppl` = the same NLL per whitespace word / UTF-8 byte; `max_inf_norm`, `kurtosis` (mean over
tracked tensors), `sink_rate@0.3` (% of layer-head pairs whose mean attention on token 0 exceeds 0.3, at T=64)
and `first_token_share` come from the `probes` task; for each downstream task `<task>` (blimp, cloze, nextsent,
agreement, or any lm-eval task), `<task>_acc`, `<task>_flip_rate` (items whose prediction differs from fp32's on the
same items) and `<task>_recovery` (accuracy / fp32 accuracy) come from that task through lm-eval (definitions in
REFERENCE.md section 3 and qbench/probes/stats.py)."""


def _markdown(frame: pd.DataFrame) -> str:
    """Markdown table; missing values (NaN) print as '-'."""
    return frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="-")


def write_report(store: ResultStore, out_dir: Path | None = None, fmt: str = "md") -> tuple[Path, Path]:
    """summary.csv always; REPORT.md (tables + plots) or REPORT.html."""
    out_dir = Path(out_dir or store.root)
    table = comparison_table(store.records())
    summary = out_dir / "summary.csv"
    table.to_csv(summary, index=False)
    if fmt == "csv":
        return summary, summary
    plots = write_plots(store, table, out_dir) if not table.empty else []
    if fmt == "html":
        report = out_dir / "REPORT.html"
        parts = ["<h1>qbench report</h1>", f"<p>{COLUMN_NOTES}</p>"]
        for model, group in table.groupby("model", sort=False):
            parts += [f"<h2>{model}</h2>", group.drop(columns="model").to_html(index=False, float_format="%.4g")]
        parts += [f'<img src="plots/{p.name}">' for p in plots]
        report.write_text("\n".join(parts))
        return summary, report
    lines = ["# qbench report", "", "Perplexity under each scheme next to the fp32 row of the same protocol.", "",
             COLUMN_NOTES, ""]
    for model, group in table.groupby("model", sort=False):
        lines += [f"## {model}", "", _markdown(group.drop(columns="model")), ""]
    schemes = [s for s in table.scheme.unique() if (table.scheme == s).sum() > 1]
    if schemes:
        lines += ["## Models side by side, per scheme", ""]
        for scheme in sorted(schemes, key=lambda s: (s != REFERENCE_SCHEME, s)):
            compact = cross_model_table(table, scheme)[["model", "ppl", "delta_ppl", "rel_delta_%", "kl",
                                                         "top1_agreement"]]
            lines += [f"### {scheme}", "", _markdown(compact), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    corrupt = store.corrupt()
    if corrupt:
        lines += [f"Skipped {len(corrupt)} corrupt record(s): " + ", ".join(p.name for p in corrupt), ""]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines))
    return summary, report
