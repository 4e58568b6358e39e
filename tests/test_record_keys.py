"""Committed records stay addressable: re-planning their cells with today's code gives the
keys they were stored under (the arm redesign, kernel and hook changes must not move them)."""
import json

import pytest

from qbench.plan import plan_cells
from qbench.paths import REPO_ROOT

RECORDS = REPO_ROOT / "results" / "records"
WANTED = [("tiny-vga", "w8a8-pt", "ppl"), ("tiny-vga", "w8a8-attn", "probes"), ("tiny-clipped", "fp32", "ppl"),
          ("tiny-iga-s1", "w8a8-attn", "ppl"), ("tiny-qwen-g1", "w8a8-dyn", "ppl"), ("bb-vga", "fp32", "ppl"),
          ("small-vga-out", "w8a8-pt", "ppl")]


def committed(model, scheme, task):
    for path in sorted(RECORDS.glob("*.json")):
        record = json.loads(path.read_text())
        if (record["model"], record["scheme"], record["config"]["evaluation"]["task"]) == (model, scheme, task):
            return record
    pytest.skip(f"no committed record of {model} {scheme} {task}")


@pytest.mark.parametrize("model,scheme,task", WANTED)
def test_committed_record_is_found_by_its_recomputed_key(model, scheme, task):
    record = committed(model, scheme, task)
    protocol = record["config"]["evaluation"]["protocol"]
    calibration = record["config"]["seeds"]["calibration"]
    planned = plan_cells([model], [scheme], [task], limit=protocol.get("max_chars"),
                         calibration_seeds=[calibration] if calibration is not None else None)
    assert record["key"] in {p.cell.key for p in planned}
