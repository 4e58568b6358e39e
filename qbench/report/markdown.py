"""Markdown tables: padded (`markdown_table`) and compact (`compact_markdown`, no padding,
for a first screen within 120 columns)."""
from __future__ import annotations

import pandas as pd


def markdown_table(frame: pd.DataFrame) -> str:
    """Markdown table; missing values (NaN) print as '-'."""
    return frame.astype(object).where(frame.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="-")


def compact_markdown(frame: pd.DataFrame) -> str:
    """A pipe table without padding, so that the first screen stays within 120 columns."""
    def cell(v) -> str:
        return "-" if v is None or (isinstance(v, float) and v != v) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
