"""CI: the committed generated files are what the committed records give.

Regenerates, into a temporary folder and without computing any cell, STUDY.md (from the
records and the checkpoints' mechanism logs), docs/RESEARCH.md's generated results text,
REPORT.md and summary.csv, and the README's family x scheme table (qbench.quant.support,
from the families' data and the schemes' needs), and compares them with the committed ones; the plots must be the
same set of files (PNG bytes depend on the matplotlib build, so only names are compared).
Exit 1 with a unified diff of what differs; `make study && make report` fixes it.
"""
from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

from qbench.paths import REPO_ROOT, models_dir
from qbench.quant import support
from qbench.report import write_report
from qbench.results import ResultStore
from qbench.study import write_study
from qbench.study.facts import Facts
from qbench.study.prose import GENERATED_DOC, render_readme
from qbench.zoo import read_zoo

RESULTS = REPO_ROOT / "results"


def compare(name: str, committed: str, fresh: str) -> list[str]:
    if committed == fresh:
        return []
    diff = difflib.unified_diff(committed.splitlines(), fresh.splitlines(), f"committed {name}", f"regenerated {name}",
                                lineterm="", n=1)
    return [f"{name} is stale against the committed records:", *list(diff)[:40]]


def main() -> int:
    store = ResultStore(RESULTS)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        study = write_study(store, out, models_dir(), discussion=REPO_ROOT / "study" / "DISCUSSION.md")
        problems += compare("results/STUDY.md", (RESULTS / "STUDY.md").read_text(), study.read_text())
        readme = GENERATED_DOC.read_text()
        problems += compare(f"{GENERATED_DOC.relative_to(REPO_ROOT)} (generated results text)", readme,
                            render_readme(readme, Facts(store.records(), models_dir())))
        user_readme = (REPO_ROOT / "README.md").read_text()
        problems += compare("README.md (family x scheme table; python -m qbench.quant.support --write-readme)",
                            user_readme, support.render_readme(user_readme))
        summary, report = write_report(store, out, zoo=read_zoo())
        problems += compare("results/REPORT.md", (RESULTS / "REPORT.md").read_text(), report.read_text())
        problems += compare("results/summary.csv", (RESULTS / "summary.csv").read_text(), summary.read_text())
        committed = {p.name for p in (RESULTS / "plots").glob("*.png")}
        fresh = {p.name for p in (out / "plots").glob("*.png")}
        if committed != fresh:
            problems.append(f"results/plots differs: missing {sorted(fresh - committed)}, "
                            f"extra {sorted(committed - fresh)}")
    print("\n".join(problems) if problems else "generated files match the committed records")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
