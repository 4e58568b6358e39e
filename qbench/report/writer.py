"""The report: summary.csv always; REPORT.md or a self-contained REPORT.html with the
headline matrix first, then the details folded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qbench.report.markdown import compact_markdown, markdown_table
from qbench.report.matrix import (
    EXTREME_LEGEND, FIRST_SCREEN_LEGEND, MATRIX_LEGEND, SCHEME_GROUP_TITLES, first_screen_table, fp_ppl_by_row,
    headline_matrix, matrix_table, matrix_values, worst_cells,
)
from qbench.report.failures import FAILURE_LEGEND, failures_and_marks
from qbench.report.html_page import render_html
from qbench.report.plots import write_heatmap, write_plots
from qbench.report.records import REFERENCE_SCHEME, EmptyReportError, label_checkpoints, select_records
from qbench.report.tables import COLUMN_NOTES, comparison_table, cross_model_table, extreme_token_summary
from qbench.results import ResultStore, atomic_write_text


def write_report(store: ResultStore, out_dir: Path | None = None, fmt: str = "md", models: str | None = None,
                 schemes: list[str] | None = None, *, zoo: dict) -> tuple[Path, Path]:
    """summary.csv always; REPORT.md or REPORT.html (self-contained) with the headline matrix
    first.  `models` (globs) and `schemes` narrow it.  `zoo`: the zoo's entries by name
    (qbench.zoo.read_zoo(), read by the caller: the report does not import the zoo).  Raises
    EmptyReportError when there is nothing to compare (no records, or only fp32 ones)."""
    out_dir = Path(out_dir or store.root)
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
    sections = report_sections(records, table, cells, zoo)
    if fmt == "html":
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
        listed = ", ".join(p.name for p in quarantined[:20]) + (f", and {len(quarantined) - 20} more"
                                                                if len(quarantined) > 20 else "")
        lines += [f"{len(quarantined)} invalid record(s) are in records/.quarantine/ (recomputed when their cells "
                  "are asked for again): " + listed, ""]
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
            parts.insert(0, markdown_table(self.table))
        return "\n\n".join(parts)


def report_sections(records: list[dict], table: pd.DataFrame, cells: pd.DataFrame,
                    zoo: dict) -> list[Section]:
    """The report in reading order: the first screen (representative schemes, within 120
    columns), the worst cells and the extreme tokens, then the full matrix and the details,
    folded."""
    failures, marks = failures_and_marks(records, zoo)
    first = first_screen_table(cells, fp_ppl_by_row(records, zoo), marks)
    legend = FIRST_SCREEN_LEGEND + (" " + FAILURE_LEGEND if marks else "")
    sections = [Section("Perplexity change vs fp32 (%): the representative schemes", first if not first.empty else None,
                        legend if not first.empty else "No quantized perplexity cell has an fp32 reference.")]
    if not failures.empty:  # why each failed cell failed, where the reader looks (not folded)
        sections.append(Section(f"Failed cells ({len(failures)}): why", failures, FAILURE_LEGEND))
    if not cells.empty:
        sections.append(Section("The five worst cells", worst_cells(cells)))
    extreme = extreme_token_summary(records)
    if not extreme.empty:
        sections.append(Section("Extreme tokens in full precision (fp32 probes)", extreme, EXTREME_LEGEND))
    for group, title in SCHEME_GROUP_TITLES.items():
        part = cells[cells.group == group] if not cells.empty else cells
        matrix = matrix_table(part, marks) if not part.empty else pd.DataFrame()
        if not matrix.empty:
            sections.append(Section(f"Full matrix, {title}: models x schemes", matrix,
                                    MATRIX_LEGEND + (" " + FAILURE_LEGEND if marks else ""), fold=True))
    sections.append(Section("Per model", None, "Perplexity under each scheme next to the fp32 row of the same "
                            "protocol.\n\n" + COLUMN_NOTES))
    for model, group in table.groupby("model", sort=False):
        sections.append(Section(f"Per model: {model}", group.drop(columns="model"), fold=True))
    schemes = [s for s in table.scheme.unique() if (table.scheme == s).sum() > 1]
    for scheme in sorted(schemes, key=lambda s: (s != REFERENCE_SCHEME, s)):
        compact = cross_model_table(table, scheme)[["model", "ppl", "delta_ppl", "rel_delta_%", "kl", "top1_agreement"]]
        sections.append(Section(f"Per scheme: {scheme}", compact, fold=True))
    return sections
