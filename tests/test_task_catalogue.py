"""Tasks are objects in one catalogue (qbench.eval.catalogue) and records are one type
(qbench.record): a task registered at test time is planned by the bench, shown in the
report and sampled by recheck; a record names one protocol and its hashes by what they
cover; the store and the report load no torch, and reading a store moves no file."""
import json
import math
import subprocess
import sys

import pytest

from qbench.cli import main
from qbench.eval.catalogue import LmEvalTask, Task, get_task, register, unregister
from qbench.record import Record
from qbench.results import ResultStore
from record_factory import make_record

LIMIT = 3000


class MeanLogitTask(Task):
    """A native task that only this test knows: the mean logit over one short sentence."""
    name = "test_mean_logit"
    description = "the mean logit over one sentence (a test task)"
    report_columns = {"mean_logit": "mean_logit"}
    checked_metrics = ("mean_logit",)

    def run(self, model, tokenizer, protocol, evaluation, reference=None, progress=False):
        import torch

        device = next(model.parameters()).device
        ids = torch.tensor([tokenizer("the state of the union is strong").input_ids], device=device)
        with torch.no_grad():
            return {"mean_logit": float(model(input_ids=ids).logits.float().mean())}


@pytest.fixture
def mean_logit_task():
    task = register(MeanLogitTask())
    yield task
    unregister(task.name)


def test_a_task_registered_at_test_time_is_planned_reported_and_rechecked(micro_checkpoint, tmp_path,
                                                                           mean_logit_task):
    from qbench.runner import run_bench
    from qbench.plan import plan_cells
    from qbench.recheck import recheck_record, sample
    from qbench.report import comparison_table, write_report

    name = mean_logit_task.name
    planned = plan_cells([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl", name], limit=LIMIT)
    assert sorted(p.cell.task for p in planned) == ["ppl", "ppl", name, name]
    store = ResultStore(tmp_path / "results")
    records = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl", name], store, limit=LIMIT,
                        progress=False)
    ours = [r for r in records if r["task"] == name]
    assert [r["status"] for r in ours] == ["ok", "ok"] and all(math.isfinite(r["metrics"]["mean_logit"]) for r in ours)
    assert all(r["config"]["evaluation"]["task"] == name for r in ours)

    table = comparison_table(store.records()).set_index("scheme")
    assert table.loc["fp32", "mean_logit"] == pytest.approx(ours[0]["metrics"]["mean_logit"])
    _, report = write_report(store, zoo={})
    assert "mean_logit" in report.read_text()

    chosen = sample(store.records(), 10)
    assert {r["task"] for r in chosen} == {"ppl", name}
    fp32 = next(r for r in ours if r["scheme"] == "fp32")
    again = recheck_record(fp32)
    assert again.status == "ok" and again.metric == "mean_logit" and again.drift <= again.tolerance


def test_an_unregistered_name_is_an_lm_eval_task():
    assert isinstance(get_task("hellaswag"), LmEvalTask) and not get_task("hellaswag").native
    assert get_task("ppl").native and get_task("probes").native and not get_task("qbench_cloze").native


def test_a_new_record_names_one_protocol_and_its_hashes(micro_checkpoint, tmp_path):
    """The protocol string is the record's, not repeated in the metrics; the hash of the
    scored text is `metrics.scored_data_hash`, distinct from the split's `config.data_hash`."""
    from qbench.runner import run_bench

    store = ResultStore(tmp_path / "results")
    for record in run_bench([str(micro_checkpoint)], ["fp32"], ["ppl", "probes"], store, limit=LIMIT,
                            progress=False):
        metrics = record["metrics"]
        assert record["status"] == "ok" and "protocol" not in metrics and "data_hash" not in metrics
        assert metrics["scored_data_hash"] and record["config"]["data_hash"]
        assert metrics["scored_data_hash"] != record["config"]["data_hash"]  # the cut text, not the whole split
        assert Record(record).scored_data_hash == metrics["scored_data_hash"]
    probes = next(r for r in store.records() if r["task"] == "probes")
    assert probes["metrics"]["windows"] > 0


def test_an_older_record_reads_under_the_new_names():
    old = make_record(metrics={"ppl": 10.0, "protocol": "p", "data_hash": "abc"})
    assert old.scored_data_hash == "abc" and old.split_hash is None
    assert Record.problem(old, old["key"]) is None


def test_reading_a_store_with_a_malformed_record_moves_nothing(tmp_path, capsys):
    store = ResultStore(tmp_path / "results")
    for scheme, ppl in (("fp32", 10.0), ("w8a8-dyn", 11.0)):
        store.put(make_record("m", scheme, "ppl", {"ppl": ppl}))
    bad = make_record("m", "w8a8-pt", "ppl", {"ppl": 12.0})
    (store.records_dir / f"{bad['key']}.json").write_text(json.dumps({**bad, "metrics": {"ppl": "abc"}}))
    before = sorted((p.relative_to(store.root), p.read_bytes()) for p in store.records_dir.rglob("*") if p.is_file())
    for command in (["report"], ["report", "--format", "csv"], ["compare"]):
        assert main([command[0], "--results", str(store.root), *command[1:]]) == 0
    after = sorted((p.relative_to(store.root), p.read_bytes()) for p in store.records_dir.rglob("*") if p.is_file())
    assert after == before and not store.quarantined()
    assert f"{bad['key']}.json" in capsys.readouterr().err  # skipped, and said so
    assert store.get(bad["key"], quarantine=True) is None and len(store.quarantined()) == 1  # a writer moves it


def test_the_store_and_the_report_load_no_torch_and_no_zoo():
    code = ("import sys, qbench.report, qbench.results, qbench.record, qbench.eval.catalogue; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m == 'qbench.zoo'))")
    import os
    from pathlib import Path

    import qbench

    env = {**os.environ, "PYTHONPATH": str(Path(qbench.__file__).parents[1])}  # this checkout's qbench
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
