"""Records -> pandas tables (FP row and every scheme, same protocol) and REPORT.md."""
from __future__ import annotations

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


PROBE_COLUMNS = {"max_inf_norm": "max_inf_norm", "kurtosis_mean": "kurtosis", "sink_rate@0.3": "sink_rate@0.3",
                 "first_token_share_mean": "first_token_share"}


def probe_frame(records: list[dict]) -> pd.DataFrame:
    rows = [{"model": r["model"], "scheme": r["scheme"],
             **{name: (r.get("metrics") or {}).get(key) for key, name in PROBE_COLUMNS.items()}}
            for r in records if r["task"] == "probes" and r.get("status") == "ok"]
    return pd.DataFrame(rows, columns=["model", "scheme", *PROBE_COLUMNS.values()])


def comparison_table(records: list[dict]) -> pd.DataFrame:
    """One row per (model, protocol, scheme): ppl, delta_ppl and relative delta against the
    fp32 row measured under the same protocol."""
    frame = records_frame([r for r in records if r["task"] == "ppl"])
    if frame.empty:
        return frame
    reference = (frame[(frame.scheme == REFERENCE_SCHEME) & (frame.status == "ok")]
                 .set_index(["model", "protocol"])["ppl"])
    frame["fp_ppl"] = [reference.get((m, p)) for m, p in zip(frame.model, frame.protocol)]
    frame["delta_ppl"] = frame.ppl - frame.fp_ppl
    frame["rel_delta_%"] = 100.0 * frame.delta_ppl / frame.fp_ppl
    columns = ["model", "scheme", "protocol", "status", "ppl", "delta_ppl", "rel_delta_%", "kl", "top1_agreement",
               "word_ppl", "byte_ppl", "tokens"]
    probes = probe_frame(records)
    if not probes.empty:
        frame = frame.merge(probes, on=["model", "scheme"], how="left")
        columns += list(PROBE_COLUMNS.values())
    return frame[columns].sort_values(["model", "protocol", "scheme"], key=_fp_first).reset_index(drop=True)


def _fp_first(column: pd.Series) -> pd.Series:
    return column.map(lambda v: "" if v == REFERENCE_SCHEME else v) if column.name == "scheme" else column


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def write_report(store: ResultStore, out_dir: Path | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir or store.root)
    table = comparison_table(store.records())
    summary = out_dir / "summary.csv"
    table.to_csv(summary, index=False)
    lines = ["# qbench report", "", "Perplexity under each scheme next to the fp32 row of the same protocol "
             "(`delta_ppl` = quantized - fp32; `rel_delta_%` = 100 delta / fp32).", ""]
    for model, group in table.groupby("model", sort=False):
        lines += [f"## {model}", "", group.drop(columns="model").to_markdown(index=False, floatfmt=".4g"), ""]
    corrupt = store.corrupt()
    if corrupt:
        lines += [f"Skipped {len(corrupt)} corrupt record(s): " + ", ".join(p.name for p in corrupt), ""]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines))
    return summary, report
