"""Markdown tables: padded (`markdown_table`) and compact (`compact_markdown`, no padding,
for a first screen within 120 columns)."""
from __future__ import annotations

import pandas as pd


def escape_cell(value):
    """A table cell's text that cannot break its row: `|` escaped, line breaks as spaces
    (a model named `a|b` or `a\nb` would otherwise add a column or end the row)."""
    if not isinstance(value, str):
        return value
    return " ".join(value.replace("|", "\\|").splitlines()) if ("|" in value or "\n" in value or "\r" in value) \
        else value


def markdown_table(frame: pd.DataFrame) -> str:
    """Markdown table; missing values (NaN) print as '-'; cells escaped (escape_cell)."""
    frame = frame.astype(object).where(frame.notna(), None)
    for column in frame.columns:  # only columns holding such text change (the others keep their values as they are)
        if any(escape_cell(v) is not v for v in frame[column]):
            frame[column] = pd.Series([escape_cell(v) for v in frame[column]], index=frame.index, dtype=object)
    frame.columns = [escape_cell(c) for c in frame.columns]
    return frame.to_markdown(index=False, floatfmt=".4g", missingval="-")


def compact_markdown(frame: pd.DataFrame) -> str:
    """A pipe table without padding, so that the first screen stays within 120 columns."""
    def cell(v) -> str:
        return "-" if v is None or (isinstance(v, float) and v != v) else escape_cell(str(v))

    lines = ["| " + " | ".join(escape_cell(str(c)) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
