"""Arbitrary JSON values in any field of a record never raise out of `report`,
`compare` or what `bench` reads from the store; a record the schema refuses is quarantined
with a one-line reason, and every record left in the store is valid."""
import copy
import io
import json
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qbench.cli import main  # noqa: E402
from qbench.report import comparison_table, format_table  # noqa: E402
from qbench.results import ResultStore, cell_key, validate_record  # noqa: E402
from record_factory import make_record  # noqa: E402


def _record(scheme: str, task: str, metrics: dict) -> dict:
    config = {"model": {"name": "fuzz", "checkpoint_hash": "0123abcd"}, "scheme": {"name": scheme},
              "evaluation": {"task": task, "protocol": "p"}, "data_hash": "d", "qbench_version": "0"}
    return dict(make_record("fuzz", scheme, task, metrics, config=config,
                            protocol="nonoverlap-w64-bos-fuzz" if task == "ppl" else f"{task}-p",
                            quantization={"layers": 2}, provenance={"wall_seconds": 1.0}, error=None))


def _base_records() -> list[dict]:
    per_layer = {"kurtosis_per_layer": [3.0, 3.5], "max_inf_norm_per_layer": [4.0, 5.0],
                 "first_token_share_per_layer": [0.1, 0.2], "first_token_share_per_head": [[0.1, 0.2], [0.3, 0.4]]}
    records = []
    for scheme in ("fp32", "w8a8-dyn"):
        records.append(_record(scheme, "ppl", {"ppl": 60.0 + (scheme != "fp32"), "word_ppl": 900.0, "byte_ppl": 3.0,
                                               "tokens": 2000, "kl": 0.001, "top1_agreement": 0.99, "nll_sum": 8000.0}))
        records.append(_record(scheme, "probes", {"max_inf_norm": 5.0, "kurtosis_mean": 3.1, "sink_rate@0.3": 4.0,
                                                  "first_token_share_mean": 0.2, "massive_activation_max": 9.0,
                                                  **per_layer}))
        records.append(_record(scheme, "qbench_cloze", {"accuracy": 0.5, "flip_rate": 0.1, "recovery": 0.9}))
    return records


BASE = _base_records()
TOP = ["key", "model", "scheme", "task", "protocol", "status", "config", "metrics", "calibration_seed", "error",
       "traceback", "quantization", "provenance"]
METRICS = sorted({name for r in BASE for name in r["metrics"]})
FIELDS = [("record",)] + [(f,) for f in TOP] + [("metrics", m) for m in METRICS] + [
    ("config", "model"), ("config", "model", "checkpoint_hash"), ("config", "model", "name")]

SPECIAL = st.sampled_from([10 ** 400, -(10 ** 30), 2 ** 63 + 1, 1e308, -1e308, float("inf"), float("nan"), "", "ok",
                           "failed", "fp32", "ppl", [], {}, [[1, 2], [3]], [[1], 2], [1, "a"], True, 0, -1])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | SPECIAL
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=4), max_leaves=12)


def _poison(record: dict, field: tuple, value):
    if field == ("record",):
        return value
    target = record
    for name in field[:-1]:
        if not isinstance(target.get(name), dict):
            target[name] = {}
        target = target[name]
    target[field[-1]] = value
    if field[0] == "config" and isinstance(record.get("config"), dict):
        record["key"] = cell_key(record["config"])  # a consistent key: only the schema can refuse it
    return record


def _write(store: ResultStore, records: list) -> list[Path]:
    store.records_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, record in enumerate(records):
        key = record.get("key") if isinstance(record, dict) and isinstance(record.get("key"), str) else None
        name = key if key and key.isalnum() and len(key) < 100 else f"poison{index}"
        path = store.records_dir / f"{name}.json"
        path.write_text(json.dumps(record, allow_nan=True))
        paths.append(path)
    return paths


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _check(poisoned: list, commands: list[list[str]]):
    with tempfile.TemporaryDirectory() as folder:
        store = ResultStore(Path(folder) / "results")
        paths = _write(store, poisoned)
        verdicts = {p.name: store.read_file(p)[1] for p in paths}  # never raises
        assert all(why is None or (isinstance(why, str) and "\n" not in why and len(why) < 400)
                   for why in verdicts.values())
        # what `bench` reads: each cell's record, then the stored fp32 rows for its delta table
        records = [r for p in paths if (r := store.get(p.stem)) is not None]
        format_table(comparison_table([r for r in records if r["task"] == "ppl"]))
        for argv in commands:
            code, err = _run([argv[0], "--results", str(store.root), *argv[1:]])
            assert code in (0, 4), err  # 4: nothing left to compare
        assert store.quarantined() == [] and all(os.path.lexists(p) for p in paths)  # readers move nothing
        for path in paths:  # what a writer does before recomputing a cell: quarantine its invalid file
            store.get(path.stem, quarantine=True)
        assert store.corrupt() == []  # every file left in the store is a valid record
        for name, why in verdicts.items():
            if why is not None:
                assert not (store.records_dir / name).exists()
        assert len(store.quarantined()) == sum(why is not None for why in verdicts.values())


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(index=st.integers(0, len(BASE) - 1), field=st.sampled_from(FIELDS), value=JSON)
def test_any_json_in_any_field_never_raises_out_of_report_compare_or_bench(index, field, value):
    poisoned = copy.deepcopy(BASE)
    poisoned[index] = _poison(poisoned[index], field, value)
    _check(poisoned, [["report", "--format", "csv"], ["compare"], ["compare", "--scheme", "w8a8-dyn"]])


@settings(max_examples=5, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(index=st.integers(0, len(BASE) - 1), field=st.sampled_from(FIELDS), value=JSON)
def test_any_json_in_any_field_never_raises_out_of_the_plots(index, field, value):
    poisoned = copy.deepcopy(BASE)
    poisoned[index] = _poison(poisoned[index], field, value)
    _check(poisoned, [["report"]])


@settings(max_examples=300, deadline=None, database=None)
@given(value=JSON, key=st.text(max_size=30))
def test_the_schema_never_raises(value, key):
    why = validate_record(value, key)
    assert why is None or ("\n" not in why and len(why) < 400)


def test_the_base_records_are_valid():
    assert all(validate_record(r, r["key"]) is None for r in BASE)
