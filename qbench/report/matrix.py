"""The headline matrix: rows (family, arm, variant) x schemes, each cell the relative
delta-ppl % over every record folded into it; its text form, the first screen and the
worst cells.  Order and grouping come from the records' facts (qbench.report.facts)."""
from __future__ import annotations

import pandas as pd

from qbench.report.facts import (
    EIGHT_BIT_GROUP, KERNEL_GROUP, LOW_BIT_GROUP, UNKNOWN_GROUP, row_identities, row_sort_key, scheme_facts_by_name,
    scheme_group, scheme_sort_key, scheme_width,
)
from qbench.eval.catalogue import is_native
from qbench.report.records import REFERENCE_SCHEME, records_frame
from qbench.scheme_catalog import screen_columns

# -- the first screen: representative schemes ---------------------------------------------
# its columns, and the schemes each shows (one, or the best of several outlier-aware PTQ
# methods), are what the scheme catalogue's tags say (qbench.scheme_catalog.screen_columns)
SCHEME_GROUP_TITLES = {EIGHT_BIT_GROUP: "8-bit", LOW_BIT_GROUP: "6- and 4-bit", KERNEL_GROUP: "8-bit attention kernel",
                       UNKNOWN_GROUP: "other"}
FIRST_SCREEN_LEGEND = ("Cells: relative perplexity change vs the same model's fp32 in %, the mean over the records "
                       "folded into the cell (training seeds x calibration draws); `~` marks a cell whose range of "
                       "records includes 0; `-` not measured. `best 8b PTQ` / `best 4b PTQ`: the lowest mean among "
                       "the outlier-aware methods measured (SmoothQuant `sq`, Hadamard rotation `had`; GPTQ, AWQ, "
                       "HQQ at groups of 64), named after the value. `n`: training seeds; `fp32 ppl`: mean over seeds. Spreads (mean ± "
                       "sample std over the n records) and every other scheme are in the folded full matrix below.")
EXTREME_LEGEND = ("`sink_rate@0.3 %`: % of (layer, head) pairs whose mean attention on token 0 exceeds 0.3; with one "
                  "head (the Bigram-Backcopy models) that is all or nothing, so read `attn on token 0` (the mean "
                  "attention on token 0) there.")


def _short_scheme(name: str) -> str:
    for prefix in ("w8a8-", "w4-"):
        name = name.removeprefix(prefix)
    return name.removesuffix("-g64")


def fp_ppl_by_row(records: list[dict], zoo: dict) -> dict[tuple[str, str, str], float]:
    """(family, arm, variant) -> fp32 perplexity on the matrix's protocol, mean over seeds.
    `zoo`: the zoo's entries by name (the caller reads them; the report does not)."""
    frame = records_frame([r for r in records if r["task"] == "ppl"])
    if frame.empty:
        return {}
    frame = frame[(frame.status == "ok") & frame.ppl.notna()]
    main = _main_protocols(frame)
    on_main = pd.Series([main.get(m) == p for m, p in zip(frame.model, frame.protocol)], index=frame.index)
    fp = frame[(frame.scheme == REFERENCE_SCHEME) & on_main]
    per_model = fp.groupby("model").ppl.mean()
    identities = row_identities(records, zoo)
    rows: dict[tuple, list[float]] = {}
    for model, ppl in per_model.items():
        rows.setdefault(identities[model], []).append(ppl)
    return {k: sum(v) / len(v) for k, v in rows.items()}


def first_screen_table(cells: pd.DataFrame, fp: dict | None = None, failed: dict | None = None) -> pd.DataFrame:
    """One row per (family, arm, variant): fp32 ppl and the representative schemes' means;
    `failed` ((family, arm, variant, scheme) -> `failed:<reason>`) fills unmeasured cells."""
    if cells.empty:
        return pd.DataFrame()
    fp, failed = fp or {}, failed or {}
    columns = screen_columns()
    rows = []
    for (family, arm, variant), group in cells.groupby(["family", "arm", "variant"], sort=False):
        by_scheme = {c["scheme"]: c for c in group.to_dict("records")}
        value = fp.get((family, arm, variant))
        row = {"model": row_label(family, arm, variant), "n": int(group.seeds.max()),
               "fp32 ppl": "-" if value is None else f"{value:.4g}"}
        for column, schemes in columns:
            measured = [by_scheme[s] for s in schemes if s in by_scheme]
            if not measured:
                marks = [failed[(family, arm, variant, s)] for s in schemes if (family, arm, variant, s) in failed]
                row[column] = marks[0] if marks else "-"
                continue
            best = min(measured, key=lambda c: c["mean"])
            text = ("~" if overlaps_zero(best) else "") + pct(best["mean"])
            row[column] = text + (f" {_short_scheme(best['scheme'])}" if len(schemes) > 1 else "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    unmeasured = [column for column, _ in columns if (frame[column] == "-").all()]
    return frame.drop(columns=unmeasured)


def _main_protocols(frame: pd.DataFrame) -> dict[str, str]:
    """Per model, the perplexity protocol with the most quantized records (the matrix uses one)."""
    quantized = frame[frame.scheme != REFERENCE_SCHEME]
    counts = quantized.groupby(["model", "protocol"]).size().reset_index(name="n")
    counts = counts.sort_values(["model", "n", "protocol"], ascending=[True, False, True])
    return dict(zip(counts.drop_duplicates("model").model, counts.drop_duplicates("model").protocol))


def matrix_values(records: list[dict], zoo: dict) -> pd.DataFrame:
    """One row per (model, scheme, record): the record's relative delta-ppl % against the
    fp32 record of the same model and protocol, with its row identity (family, arm,
    variant) and, where downstream tasks ran, the cell's mean flip rate over tasks and draws."""
    frame = records_frame([r for r in records if r["task"] == "ppl"])
    columns = ["family", "arm", "variant", "model", "scheme", "group", "width", "protocol", "rel_delta_%", "flip_rate"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame[(frame.status == "ok") & frame.ppl.notna()]
    reference = frame[frame.scheme == REFERENCE_SCHEME].groupby(["model", "protocol"]).ppl.mean()
    main = _main_protocols(frame)
    frame = frame[[main.get(m) == p for m, p in zip(frame.model, frame.protocol)]]
    frame = frame[frame.scheme != REFERENCE_SCHEME].copy()
    frame["fp_ppl"] = [reference.get((m, p)) for m, p in zip(frame.model, frame.protocol)]
    frame = frame[frame.fp_ppl.notna()]
    frame["rel_delta_%"] = 100.0 * (frame.ppl - frame.fp_ppl) / frame.fp_ppl
    flips = {}
    for r in records:
        if not is_native(r["task"]) and r.get("status") == "ok" and r["scheme"] != REFERENCE_SCHEME:
            value = (r.get("metrics") or {}).get("flip_rate")
            if value is not None:
                flips.setdefault((r["model"], r["scheme"]), []).append(value)
    frame["flip_rate"] = [sum(flips[k]) / len(flips[k]) if k in flips else None
                          for k in zip(frame.model, frame.scheme)]
    identities = row_identities(records, zoo)
    identity = [identities[m] for m in frame.model]
    frame["family"], frame["arm"], frame["variant"] = zip(*identity) if identity else ((), (), ())
    facts = scheme_facts_by_name(records)
    frame["group"] = [scheme_group(facts.get(s)) for s in frame.scheme]
    frame["width"] = [scheme_width(facts.get(s)) for s in frame.scheme]
    return frame[columns].reset_index(drop=True)


def headline_matrix(values: pd.DataFrame) -> pd.DataFrame:
    """Rows (family, arm, variant) x scheme: mean, sample std, min, max and n of the relative
    delta-ppl % over every record folded into the cell (training seeds x calibration
    draws), the number of seeds, the mean flip rate where a task ran, and the scheme's
    column group and width (qbench.report.facts)."""
    if values.empty:
        return pd.DataFrame(columns=["family", "arm", "variant", "scheme", "group", "width", "mean", "std", "min",
                                     "max", "n", "seeds", "flip_rate"])
    keys = ["family", "arm", "variant", "scheme", "group", "width"]
    grouped = values.groupby(keys, sort=False)
    cells = grouped["rel_delta_%"].agg(["mean", "std", "min", "max", "size"]).rename(columns={"size": "n"})
    cells["seeds"] = grouped["model"].nunique()
    cells["flip_rate"] = grouped["flip_rate"].mean()
    cells = cells.reset_index()
    cells["std"] = cells["std"].where(cells.n > 1)
    order = sorted(cells[["family", "arm", "variant"]].drop_duplicates().itertuples(index=False),
                   key=lambda r: row_sort_key(*r))
    rank = {tuple(r): i for i, r in enumerate(order)}
    schemes = scheme_order(cells)
    cells["_row"] = [rank[(f, a, v)] for f, a, v in zip(cells.family, cells.arm, cells.variant)]
    cells["_col"] = [schemes.index(s) for s in cells.scheme]
    return cells.sort_values(["_row", "_col"]).drop(columns=["_row", "_col"]).reset_index(drop=True)


def scheme_order(cells: pd.DataFrame) -> list[str]:
    """The matrix's columns: the schemes of `cells` by group, widest first, then name."""
    columns = cells[["scheme", "group", "width"]].drop_duplicates("scheme")
    return [name for name, _, _ in sorted(columns.itertuples(index=False), key=lambda c: scheme_sort_key(*c))]


def overlaps_zero(cell) -> bool:
    """The folded records' range [min, max] includes 0 (n = 1: a point, never marked)."""
    return cell["n"] > 1 and cell["min"] <= 0.0 <= cell["max"]


def pct(value: float, signed: bool = True) -> str:
    digits = 0 if abs(value) >= 10 else 1 if abs(value) >= 1 else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_cell(cell) -> str:
    """`+0.23±0.06 (6)`: mean ± std (n records); `~` where the range includes 0; ` f1.5%`:
    the mean flip rate where downstream tasks ran."""
    text = pct(cell["mean"])
    if cell["n"] > 1:
        text += "±" + pct(cell["std"], signed=False)
    text += f" ({int(cell['n'])})"
    if overlaps_zero(cell):
        text = "~" + text
    if pd.notna(cell.get("flip_rate")):
        text += f" f{100 * cell['flip_rate']:.1f}%"
    return text


def row_label(family: str, arm: str, variant: str) -> str:
    return f"{family} · {arm}" + (f" ({variant})" if variant else "")


def matrix_table(cells: pd.DataFrame, failed: dict | None = None) -> pd.DataFrame:
    """The matrix as text: one row per (family, arm, variant), one column per scheme; a
    cell whose run failed shows `failed:<reason>` (`failed`: qbench.report.failures)."""
    if cells.empty:
        return pd.DataFrame()
    failed = failed or {}
    schemes = scheme_order(cells)
    rows = []
    for (family, arm, variant), group in cells.groupby(["family", "arm", "variant"], sort=False):
        row = {"model (family · arm)": row_label(family, arm, variant), "seeds": int(group.seeds.max())}
        by_scheme = {c["scheme"]: c for c in group.to_dict("records")}
        row.update({s: format_cell(by_scheme[s]) if s in by_scheme else failed.get((family, arm, variant, s), "-")
                    for s in schemes})
        rows.append(row)
    return pd.DataFrame(rows)


MATRIX_LEGEND = ("Cells: relative perplexity change vs fp32 in %, `mean±std (n)` over the n records folded into the "
                 "cell (training seeds x calibration draws; sample std; n = 1 has no spread); `~` marks cells whose "
                 "range of records includes 0 (no loss distinguishable from the spread); `f1.5%` is the mean flip rate "
                 "over the downstream tasks that ran for that cell. Columns, from what each record says about its "
                 "scheme: 8-bit, 6/4-bit, then the 8-bit attention kernel; within a group the narrowest bit width, "
                 "widest first, then by name. Rows: families tiny, small, bb, pretrained, then the others by name; "
                 "within a family softmax first, then arms by name. Each model's most-measured perplexity protocol "
                 "is used.")


def worst_cells(cells: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    top = cells.sort_values("mean", ascending=False).head(k)
    return pd.DataFrame({"model (family · arm)": [row_label(f, a, v) for f, a, v in zip(top.family, top.arm, top.variant)],
                         "scheme": top.scheme, "rel_delta_%": [format_cell(c) for c in top.to_dict("records")]})
