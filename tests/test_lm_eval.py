"""Downstream tasks through lm-evaluation-harness on an in-memory model."""
import json

import pytest
import torch

from qbench.eval.lm_eval_tasks import TaskDataError, blimp_task_configs, run_lm_eval, task_metrics
from qbench.zoo import load_model


@pytest.fixture
def blimp_folder(tmp_path, monkeypatch):
    """Two BLiMP-format files made here, so the test does not need shared/ data."""
    pairs = {"agreement": [("The dogs bark.", "The dogs barks."), ("She has left.", "She have left.")] * 3,
             "anaphor": [("Mary saw herself.", "Mary saw himself."), ("They hurt themselves.", "They hurt herself.")] * 3}
    for name, rows in pairs.items():
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for good, bad in rows:
                f.write(json.dumps({"sentence_good": good, "sentence_bad": bad}) + "\n")
    monkeypatch.setenv("QBENCH_BLIMP_DIR", str(tmp_path))
    return tmp_path


def own_loglikelihood(loaded, text):
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])  # BOS first, as trained
    with torch.no_grad():
        log_probs = torch.log_softmax(loaded.model(ids).logits[0, :-1].float(), dim=-1)
    return log_probs.gather(1, ids[0, 1:, None]).sum().item()


def test_one_subtask_per_file_and_loglikelihoods_equal_our_own(blimp_folder, micro_checkpoint):
    configs = blimp_task_configs()
    assert [c["task"] for c in configs] == ["qbench_blimp_agreement", "qbench_blimp_anaphor"]
    loaded = load_model(str(micro_checkpoint))
    result = run_lm_eval(loaded.model, loaded.tokenizer, configs)
    rows = [json.loads(line) for line in open(blimp_folder / "agreement.jsonl")]
    for row, (ll_good, ll_bad) in zip(rows, result["loglikelihoods"]["qbench_blimp_agreement"]):
        assert ll_good == pytest.approx(own_loglikelihood(loaded, row["sentence_good"]), abs=1e-3)
        assert ll_bad == pytest.approx(own_loglikelihood(loaded, row["sentence_bad"]), abs=1e-3)
    metrics = task_metrics(result, result)
    assert metrics["items"] == 12 and metrics["flip_rate"] == 0.0 and metrics["recovery"] == 1.0


def test_flip_rate_counts_changed_predictions():
    fp = {"predictions": {"t": [0, 0, 1, 1]}, "correct": {"t": [True, True, False, False]}, "accuracy_per_task": {}}
    q = {"predictions": {"t": [0, 1, 1, 0]}, "correct": {"t": [True, False, False, True]}, "accuracy_per_task": {}}
    metrics = task_metrics(q, fp)
    assert metrics["flip_rate"] == 0.5 and metrics["accuracy"] == 0.5 and metrics["recovery"] == 1.0


def test_missing_blimp_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_BLIMP_DIR", str(tmp_path / "absent"))
    with pytest.raises(TaskDataError, match="QBENCH_BLIMP_DIR"):
        blimp_task_configs()


def test_bench_records_blimp_accuracy_and_flip_rate(blimp_folder, micro_checkpoint, tmp_path):
    from qbench.runner import run_bench
    from qbench.report import comparison_table
    from qbench.results import ResultStore

    records = run_bench([str(micro_checkpoint)], ["fp32", "w6a6"], ["ppl", "qbench_blimp"],
                        ResultStore(tmp_path / "results"), limit=3000, progress=False)
    blimp = [r for r in records if r["task"] == "qbench_blimp"]
    assert [r["status"] for r in blimp] == ["ok", "ok"]
    assert 0 <= blimp[1]["metrics"]["flip_rate"] <= 1 and blimp[1]["metrics"]["items"] == 12
    table = comparison_table(records).set_index("scheme")
    assert table.loc["fp32", "blimp_flip_rate"] == 0.0


def test_task_items_changed_after_planning_are_refused_not_recorded(micro_checkpoint, tmp_path, monkeypatch):
    """A planned lm-eval cell is keyed by its items' hash: if the items differ when it runs
    (a task file changed under a sweep), the cell stops with the data error (exit 4) instead
    of recording other items under the planned key."""
    import qbench.runner as bench
    from qbench.plan import plan_cells
    from qbench.results import ResultStore

    from qbench.eval.catalogue import get_task

    planned = plan_cells([str(micro_checkpoint)], ["fp32"], ["qbench_cloze"], task_limit=4)
    task = get_task("qbench_cloze")
    original = task.spec
    monkeypatch.setattr(task, "spec", lambda limit: {**original(limit), "items_hash": "changed"})
    store = ResultStore(tmp_path / "results")
    with pytest.raises(TaskDataError, match="changed after the cell was planned"):
        bench.run_cells(planned, store, progress=False)
    assert store.get(planned[0].cell.key) is None
