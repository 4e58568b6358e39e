"""The per-model tables: one row per (model, protocol, scheme) with the fp32 row of the same
protocol, probe and downstream-task columns, and the fp32 extreme-token summary."""
from __future__ import annotations

import pandas as pd

from qbench.eval.catalogue import is_native, native_tasks
from qbench.report.records import REFERENCE_SCHEME, records_frame

TASK_METRICS = {"accuracy": "acc", "flip_rate": "flip_rate", "recovery": "recovery"}


def task_short(task: str) -> str:
    return task.removeprefix("qbench_")


def task_frame(records: list[dict]) -> pd.DataFrame:
    """Downstream task metrics (every task that is not native: lm-eval's), one row per
    (model, scheme) with columns <task>_acc / _flip_rate / _recovery (calibration draws
    averaged).  fp32 rows carry flip_rate 0 and recovery 1 by definition."""
    rows = []
    for r in records:
        if is_native(r["task"]) or r.get("status") != "ok":
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

def native_task_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (model, scheme): the report columns of every native task that has ok
    records (probes: max_inf_norm, kurtosis, ...; Task.report_columns), averaged over
    calibration draws."""
    wanted = {task.name: task.report_columns for task in native_tasks() if task.report_columns}
    ok = [r for r in records if r["task"] in wanted and r.get("status") == "ok"]
    present = [name for name in wanted if any(r["task"] == name for r in ok)]
    columns = [column for name in present for column in wanted[name].values()]
    rows = [{"model": r["model"], "scheme": r["scheme"],
             **{name: (r.get("metrics") or {}).get(key) for key, name in wanted[r["task"]].items()}} for r in ok]
    frame = pd.DataFrame(rows, columns=["model", "scheme", *columns])
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
    native = native_task_frame(records)
    if not native.empty:
        frame = frame.merge(native, on=["model", "scheme"], how="left")
        columns += [c for c in native.columns if c not in ("model", "scheme")]
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


EXTREME_COLUMNS = {"sink_rate@0.3": "sink_rate@0.3 %", "first_token_share_mean": "attn on token 0",
                   "max_inf_norm": "max inf-norm", "kurtosis_mean": "kurtosis (mean)",
                   "massive_activation_max": "massive activation"}


def extreme_token_summary(records: list[dict]) -> pd.DataFrame:
    """Per model, the fp32 probes: sink rate, max inf-norm, mean kurtosis, the largest
    activation (calibration draws do not apply to fp32; several records are averaged)."""
    rows = [{"model": r["model"], **{name: (r.get("metrics") or {}).get(key) for key, name in EXTREME_COLUMNS.items()}}
            for r in records if r["task"] == "probes" and r["scheme"] == REFERENCE_SCHEME and r.get("status") == "ok"]
    frame = pd.DataFrame(rows, columns=["model", *EXTREME_COLUMNS.values()])
    return frame.groupby("model", as_index=False, sort=True).mean() if rows else frame
