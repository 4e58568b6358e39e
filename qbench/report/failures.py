"""Failed cells where the user looks: a short reason per failed cell (the report's matrices
show it instead of `-`, with a legend) and the full reasons in one table.

A cell counts as failed when its records failed and none of the same (model, scheme,
task, protocol) succeeded (a recomputed cell replaces its failure)."""
from __future__ import annotations

import pandas as pd

# the error's exception type (or a phrase of it) -> the short form shown in a cell
REASONS = {
    "NonFiniteError": "nonfinite",
    "OutOfMemoryError": "oom",
    "TaskDataError": "data",
    "CorpusError": "data",
    "ImportError": "package",
    "ModuleNotFoundError": "package",
    "WorkerDied": "died",
    "UnsupportedFamily": "family",
}
PHRASES = {"none of the known model families": "family", "out of memory": "oom", "not supported": "unsupported"}
FAILURE_LEGEND = ("`failed:<reason>`: the cell's run failed (nothing was measured): `nonfinite` NaN/inf logits or an "
                  "overflowing loss, `oom` out of memory, `data` missing data, `package` a missing optional package, "
                  "`family` the model's family is not supported by the scheme, `died` the worker died twice, "
                  "`unsupported` the backend refused; other reasons are the exception's name. The full message of each "
                  "is in the table of failed cells and in the record's `error`.")


def short_reason(error: str | None) -> str:
    text = str(error or "")
    kind = text.split(":", 1)[0].strip()
    for phrase, reason in PHRASES.items():
        if phrase in text.lower():
            return reason
    return REASONS.get(kind, kind.lower()[:16] or "unknown")


def failed_cells(records: list[dict]) -> pd.DataFrame:
    """model, scheme, task, protocol, reason (short), error (the message, cut to 300 characters)."""
    done = {(r["model"], r["scheme"], r["task"], r.get("protocol")) for r in records if r.get("status") == "ok"}
    rows, seen = [], set()
    for r in records:
        key = (r["model"], r["scheme"], r["task"], r.get("protocol"))
        if r.get("status") == "ok" or key in done or key in seen:
            continue
        seen.add(key)
        error = " ".join(str(r.get("error") or "").split())
        rows.append({"model": r["model"], "scheme": r["scheme"], "task": r["task"], "protocol": r.get("protocol"),
                     "reason": short_reason(error), "error": error[:300] + ("..." if len(error) > 300 else "")})
    return pd.DataFrame(rows, columns=["model", "scheme", "task", "protocol", "reason", "error"])


def failure_marks(records: list[dict], identities: dict) -> dict[tuple, str]:
    """(family, arm, variant, scheme) -> `failed:<reason>` for the perplexity cells that
    failed (the matrix's cells; `identities`: model -> (family, arm, variant))."""
    frame = failed_cells([r for r in records if r["task"] == "ppl"])
    marks = {}
    for model, scheme, reason in zip(frame.model, frame.scheme, frame.reason):
        if model in identities:
            marks.setdefault((*identities[model], scheme), f"failed:{reason}")
    return marks


def failure_lines(records: list[dict]) -> list[str]:
    """One line per failed cell: `model scheme task: reason: message` (the sweep's summary)."""
    frame = failed_cells(records)
    return [f"{m} {s} {t}: {reason}: {e}" for m, s, t, reason, e in
            zip(frame.model, frame.scheme, frame.task, frame.reason, frame.error)]


def failures_and_marks(records: list[dict], zoo: dict) -> tuple[pd.DataFrame, dict]:
    """failed_cells(records) and the matrix marks of the failed perplexity cells."""
    failures = failed_cells(records)
    if failures.empty:
        return failures, {}
    from qbench.report.facts import row_identities

    return failures, failure_marks(records, row_identities(records, zoo))
