"""Records -> pandas tables (FP row and every scheme, same protocol) and REPORT.md."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qbench.results import ResultStore, save_figure

REFERENCE_SCHEME = "fp32"


class EmptyReportError(ValueError):
    """Nothing to compare: the store holds no records, or none besides fp32."""


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


def label_checkpoints(records: list[dict], zoo: dict | None = None) -> list[dict]:
    """Records whose checkpoint differs from the one the zoo lists under their model name
    (a corrupted or retrained checkpoint) get the model name `name@<short hash>`, so reports
    never average different checkpoints; outside the zoo, a name seen with several
    checkpoints is split the same way."""
    from qbench.zoo import read_zoo

    zoo = read_zoo() if zoo is None else zoo
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


def write_report(store: ResultStore, out_dir: Path | None = None, fmt: str = "md", models: str | None = None,
                 schemes: list[str] | None = None) -> tuple[Path, Path]:
    """summary.csv always; REPORT.md or REPORT.html (self-contained) with the headline matrix
    first.  `models` (globs) and `schemes` narrow it.  Raises EmptyReportError when there
    is nothing to compare (no records, or only fp32 ones)."""
    from qbench.results import atomic_write_text
    from qbench.zoo import read_zoo

    out_dir = Path(out_dir or store.root)
    zoo = read_zoo()
    records = select_records(label_checkpoints(store.records(), zoo), models, schemes)
    where = f" matching --models {models!r}" if models else ""
    if not records:
        raise EmptyReportError(f"no records{where} in {store.root}: run `qbench bench` first")
    if all(r["scheme"] == REFERENCE_SCHEME for r in records):
        raise EmptyReportError(f"only fp32 records{where} in {store.root}: nothing to compare; "
                               "run a quantized scheme (qbench list schemes)")
    table = comparison_table(records)
    cells = headline_matrix(matrix_values(records, zoo))
    summary = out_dir / "summary.csv"
    atomic_write_text(summary, table.to_csv(index=False))
    if fmt == "csv":
        return summary, summary
    heatmap = write_heatmap(cells, out_dir / "plots" / "headline_matrix.png")
    plots = write_plots(store, table, out_dir, records) if not table.empty else []
    sections = report_sections(records, table, cells)
    if fmt == "html":
        from qbench.report_html import render_html

        report = out_dir / "REPORT.html"
        atomic_write_text(report, render_html(sections, heatmap, plots))
        return summary, report
    first = sections[0]
    lines = ["# qbench report", "", f"## {first.title}", "",
             compact_markdown(first.table) if first.table is not None else "", "", first.text, ""]
    if heatmap is not None:
        lines += [f"![headline matrix heatmap](plots/{heatmap.name})", ""]
    for section in sections[1:]:
        if section.fold:
            lines += ["<details>", f"<summary>{section.title}</summary>", "", section.markdown(), "", "</details>", ""]
        else:
            lines += [f"## {section.title}", "", section.markdown(), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    quarantined = store.quarantined()
    if quarantined:
        lines += [f"{len(quarantined)} invalid record(s) are in records/.quarantine/ (recomputed when their cells "
                  "are asked for again): " + ", ".join(p.name for p in quarantined), ""]
    report = out_dir / "REPORT.md"
    atomic_write_text(report, "\n".join(lines))
    return summary, report


@dataclass
class Section:
    title: str
    table: pd.DataFrame | None = None
    text: str = ""
    fold: bool = False  # folded (<details>) in the HTML report

    def markdown(self) -> str:
        parts = [self.text] if self.text else []
        if self.table is not None:
            parts.insert(0, _markdown(self.table))
        return "\n\n".join(parts)


def report_sections(records: list[dict], table: pd.DataFrame, cells: pd.DataFrame) -> list[Section]:
    """The report in reading order: the first screen (representative schemes, within 120
    columns), the worst cells and the extreme tokens, then the full matrix and the details,
    folded."""
    first = first_screen_table(cells, fp_ppl_by_row(records))
    sections = [Section("Perplexity change vs fp32 (%): the representative schemes", first if not first.empty else None,
                        FIRST_SCREEN_LEGEND if not first.empty else
                        "No quantized perplexity cell has an fp32 reference.")]
    if not cells.empty:
        sections.append(Section("The five worst cells", worst_cells(cells)))
    extreme = extreme_token_summary(records)
    if not extreme.empty:
        sections.append(Section("Extreme tokens in full precision (fp32 probes)", extreme, EXTREME_LEGEND))
    for group, title in SCHEME_GROUP_TITLES.items():
        part = cells[[scheme_group(s) == group for s in cells.scheme]] if not cells.empty else cells
        matrix = matrix_table(part) if not part.empty else pd.DataFrame()
        if not matrix.empty:
            sections.append(Section(f"Full matrix, {title}: models x schemes", matrix, MATRIX_LEGEND, fold=True))
    sections.append(Section("Per model", None, "Perplexity under each scheme next to the fp32 row of the same "
                            "protocol.\n\n" + COLUMN_NOTES))
    for model, group in table.groupby("model", sort=False):
        sections.append(Section(f"Per model: {model}", group.drop(columns="model"), fold=True))
    schemes = [s for s in table.scheme.unique() if (table.scheme == s).sum() > 1]
    for scheme in sorted(schemes, key=lambda s: (s != REFERENCE_SCHEME, s)):
        compact = cross_model_table(table, scheme)[["model", "ppl", "delta_ppl", "rel_delta_%", "kl", "top1_agreement"]]
        sections.append(Section(f"Per scheme: {scheme}", compact, fold=True))
    return sections


# -- the first screen: representative schemes ---------------------------------------------
# (column, the schemes it shows: one, or the best of several outlier-aware PTQ methods)
BEST_8BIT_PTQ = ["w8a8-pt-sq", "w8a8-pt-had", "w8a8-sq", "w8a8-had", "w8a8-sq-a25", "w8a8-sq-a75", "w8a8-sq-a85"]
BEST_4BIT_PTQ = ["w4-gptq-g64", "w4-awq-g64", "w4-hqq-g64"]
FIRST_SCREEN = [("w8a8-dyn", ["w8a8-dyn"]), ("w8a8-pt", ["w8a8-pt"]), ("best 8b PTQ", BEST_8BIT_PTQ),
                ("llm-int8", ["llm-int8"]), ("w4-rtn-g64", ["w4-rtn-g64"]), ("best 4b PTQ", BEST_4BIT_PTQ),
                ("nf4", ["nf4"]), ("w8a8-attn", ["w8a8-attn"])]
SCHEME_GROUP_TITLES = {1: "8-bit", 2: "6- and 4-bit", 3: "8-bit attention kernel", 4: "other"}
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


def fp_ppl_by_row(records: list[dict], zoo: dict | None = None) -> dict[tuple[str, str, str], float]:
    """(family, arm, variant) -> fp32 perplexity on the matrix's protocol, mean over seeds."""
    from qbench.zoo import read_zoo

    zoo = read_zoo() if zoo is None else zoo
    frame = records_frame([r for r in records if r["task"] == "ppl"])
    if frame.empty:
        return {}
    frame = frame[(frame.status == "ok") & frame.ppl.notna()]
    main = _main_protocols(frame)
    on_main = pd.Series([main.get(m) == p for m, p in zip(frame.model, frame.protocol)], index=frame.index)
    fp = frame[(frame.scheme == REFERENCE_SCHEME) & on_main]
    per_model = fp.groupby("model").ppl.mean()
    rows: dict[tuple, list[float]] = {}
    for model, ppl in per_model.items():
        rows.setdefault(_row_identity(model, zoo), []).append(ppl)
    return {k: sum(v) / len(v) for k, v in rows.items()}


def first_screen_table(cells: pd.DataFrame, fp: dict | None = None) -> pd.DataFrame:
    """One row per (family, arm, variant): fp32 ppl and the representative schemes' means."""
    if cells.empty:
        return pd.DataFrame()
    fp = fp or {}
    rows = []
    for (family, arm, variant), group in cells.groupby(["family", "arm", "variant"], sort=False):
        by_scheme = {c["scheme"]: c for c in group.to_dict("records")}
        value = fp.get((family, arm, variant))
        row = {"model": row_label(family, arm, variant), "n": int(group.seeds.max()),
               "fp32 ppl": "-" if value is None else f"{value:.4g}"}
        for column, schemes in FIRST_SCREEN:
            measured = [by_scheme[s] for s in schemes if s in by_scheme]
            if not measured:
                row[column] = "-"
                continue
            best = min(measured, key=lambda c: c["mean"])
            text = ("~" if overlaps_zero(best) else "") + _pct(best["mean"])
            row[column] = text + (f" {_short_scheme(best['scheme'])}" if len(schemes) > 1 else "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    unmeasured = [column for column, _ in FIRST_SCREEN if (frame[column] == "-").all()]
    return frame.drop(columns=unmeasured)


def compact_markdown(frame: pd.DataFrame) -> str:
    """A pipe table without padding, so that the first screen stays within 120 columns."""
    def cell(v) -> str:
        return "-" if v is None or (isinstance(v, float) and v != v) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# -- the headline matrix --------------------------------------------------------------

FAMILY_ORDER = ["tiny", "small", "bb", "pretrained"]


def scheme_group(name: str) -> int:
    """Column order: 16-bit reference, 8-bit, then 6/4-bit, then the attention kernel."""
    from qbench.quant import get_scheme

    try:
        scheme = get_scheme(name)
    except (KeyError, ValueError):
        return 4
    if scheme.options.get("attention_kernel"):
        return 3
    if scheme.backend == "reference":
        return 0
    bits = [b for b in (scheme.weight_bits, scheme.activation_bits) if b]
    return 1 if bits and min(bits) >= 8 else 2


def scheme_order(names) -> list[str]:
    from qbench.quant import SCHEMES

    registry = list(SCHEMES)
    return sorted(set(names), key=lambda n: (scheme_group(n), registry.index(n) if n in registry else 999, n))


def _row_identity(model: str, zoo: dict) -> tuple[str, str, str]:
    """(family, arm, variant) of a model: its zoo preset and arm; the step count joins the
    arm where a checkpoint trained longer than its preset (`-3k`); models outside the zoo
    are their own row."""
    base = model.split("@", 1)[0]
    entry = zoo.get(base)
    if not entry:
        return "other", model, ""
    arm = entry.get("arm", base) if entry.get("preset") != "pretrained" else base
    variant = f"{entry['steps']} steps" if base.endswith("-3k") and "steps" in entry else ""
    if "@" in model:  # a changed checkpoint: never folded with the zoo's
        variant = (variant + " " if variant else "") + model.split("@", 1)[1]
    return entry.get("preset", "other"), arm, variant


def _main_protocols(frame: pd.DataFrame) -> dict[str, str]:
    """Per model, the perplexity protocol with the most quantized records (the matrix uses one)."""
    quantized = frame[frame.scheme != REFERENCE_SCHEME]
    counts = quantized.groupby(["model", "protocol"]).size().reset_index(name="n")
    counts = counts.sort_values(["model", "n", "protocol"], ascending=[True, False, True])
    return dict(zip(counts.drop_duplicates("model").model, counts.drop_duplicates("model").protocol))


def matrix_values(records: list[dict], zoo: dict | None = None) -> pd.DataFrame:
    """One row per (model, scheme, record): the record's relative delta-ppl % against the
    fp32 record of the same model and protocol, with its row identity (family, arm,
    variant) and, where downstream tasks ran, the cell's mean flip rate over tasks and draws."""
    from qbench.zoo import read_zoo

    zoo = read_zoo() if zoo is None else zoo
    frame = records_frame([r for r in records if r["task"] == "ppl"])
    columns = ["family", "arm", "variant", "model", "scheme", "protocol", "rel_delta_%", "flip_rate"]
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
        if r["task"] not in ("ppl", "probes") and r.get("status") == "ok" and r["scheme"] != REFERENCE_SCHEME:
            value = (r.get("metrics") or {}).get("flip_rate")
            if value is not None:
                flips.setdefault((r["model"], r["scheme"]), []).append(value)
    frame["flip_rate"] = [sum(flips[k]) / len(flips[k]) if k in flips else None
                          for k in zip(frame.model, frame.scheme)]
    identity = [_row_identity(m, zoo) for m in frame.model]
    frame["family"], frame["arm"], frame["variant"] = zip(*identity) if identity else ((), (), ())
    return frame[columns].reset_index(drop=True)


def _row_sort_key(family: str, arm: str, variant: str):
    from qbench.modeling.attention import ATTENTION_ARMS

    arms = list(ATTENTION_ARMS)
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family,
            arms.index(arm) if arm in arms else len(arms), arm, variant)


def headline_matrix(values: pd.DataFrame) -> pd.DataFrame:
    """Rows (family, arm, variant) x scheme: mean, sample std, min, max and n of the relative
    delta-ppl % over every record folded into the cell (training seeds x calibration
    draws), the number of seeds, and the mean flip rate where a task ran."""
    if values.empty:
        return pd.DataFrame(columns=["family", "arm", "variant", "scheme", "mean", "std", "min", "max", "n",
                                     "seeds", "flip_rate"])
    keys = ["family", "arm", "variant", "scheme"]
    grouped = values.groupby(keys, sort=False)
    cells = grouped["rel_delta_%"].agg(["mean", "std", "min", "max", "size"]).rename(columns={"size": "n"})
    cells["seeds"] = grouped["model"].nunique()
    cells["flip_rate"] = grouped["flip_rate"].mean()
    cells = cells.reset_index()
    cells["std"] = cells["std"].where(cells.n > 1)
    order = sorted(cells[["family", "arm", "variant"]].drop_duplicates().itertuples(index=False),
                   key=lambda r: _row_sort_key(*r))
    rank = {tuple(r): i for i, r in enumerate(order)}
    schemes = scheme_order(cells.scheme)
    cells["_row"] = [rank[(f, a, v)] for f, a, v in zip(cells.family, cells.arm, cells.variant)]
    cells["_col"] = [schemes.index(s) for s in cells.scheme]
    return cells.sort_values(["_row", "_col"]).drop(columns=["_row", "_col"]).reset_index(drop=True)


def overlaps_zero(cell) -> bool:
    """The folded records' range [min, max] includes 0 (n = 1: a point, never marked)."""
    return cell["n"] > 1 and cell["min"] <= 0.0 <= cell["max"]


def _pct(value: float, signed: bool = True) -> str:
    digits = 0 if abs(value) >= 10 else 1 if abs(value) >= 1 else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_cell(cell) -> str:
    """`+0.23±0.06 (6)`: mean ± std (n records); `~` where the range includes 0; ` f1.5%`:
    the mean flip rate where downstream tasks ran."""
    text = _pct(cell["mean"])
    if cell["n"] > 1:
        text += "±" + _pct(cell["std"], signed=False)
    text += f" ({int(cell['n'])})"
    if overlaps_zero(cell):
        text = "~" + text
    if pd.notna(cell.get("flip_rate")):
        text += f" f{100 * cell['flip_rate']:.1f}%"
    return text


def row_label(family: str, arm: str, variant: str) -> str:
    return f"{family} · {arm}" + (f" ({variant})" if variant else "")


def matrix_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The matrix as text: one row per (family, arm, variant), one column per scheme."""
    if cells.empty:
        return pd.DataFrame()
    schemes = scheme_order(cells.scheme)
    rows = []
    for (family, arm, variant), group in cells.groupby(["family", "arm", "variant"], sort=False):
        row = {"model (family · arm)": row_label(family, arm, variant), "seeds": int(group.seeds.max())}
        by_scheme = {c["scheme"]: c for c in group.to_dict("records")}
        row.update({s: format_cell(by_scheme[s]) if s in by_scheme else "-" for s in schemes})
        rows.append(row)
    return pd.DataFrame(rows)


MATRIX_LEGEND = ("Cells: relative perplexity change vs fp32 in %, `mean±std (n)` over the n records folded into the "
                 "cell (training seeds x calibration draws; sample std; n = 1 has no spread); `~` marks cells whose "
                 "range of records includes 0 (no loss distinguishable from the spread); `f1.5%` is the mean flip rate "
                 "over the downstream tasks that ran for that cell. Columns: 16-bit, 8-bit, 6/4-bit, then the 8-bit "
                 "attention kernel. Each model's most-measured perplexity protocol is used.")


def write_heatmap(cells: pd.DataFrame, path: Path) -> Path | None:
    """The matrix as a heatmap, colour symmetric in log space (SymLogNorm), annotated."""
    if cells.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import SymLogNorm

    schemes = scheme_order(cells.scheme)
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
                ax.text(j, i, ("~" if marks[i, j] else "") + _pct(grid[i, j]), ha="center", va="center",
                        fontsize=6.5, color="white" if abs(grid[i, j]) > bound ** 0.6 else "black")
    fig.colorbar(image, ax=ax, label="relative delta-ppl vs fp32 (%), symmetric log scale")
    ax.set_title("qbench: perplexity change per model and scheme (~: range includes 0)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


def worst_cells(cells: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    top = cells.sort_values("mean", ascending=False).head(k)
    return pd.DataFrame({"model (family · arm)": [row_label(f, a, v) for f, a, v in zip(top.family, top.arm, top.variant)],
                         "scheme": top.scheme, "rel_delta_%": [format_cell(c) for c in top.to_dict("records")]})


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
