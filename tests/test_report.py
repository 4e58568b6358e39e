"""The headline matrix: values equal the per-model tables they summarise, seeds and draws
fold with the right n, changed checkpoints stay apart, narrowing, escaping, clear messages;
rows and columns placed by what each record says (its facts), never by the live registries."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qbench.zoo
from qbench.cli import main
from qbench.report import comparison_table, headline_matrix, label_checkpoints, matrix_values, write_report
from qbench.report.facts import scheme_facts
from qbench.results import ResultStore
from record_factory import make_record

ZOO = {
    "tiny-a": {"arm": "softmax", "preset": "tiny", "seed": 0, "steps": 10, "checkpoint_hash": "h-a0"},
    "tiny-a-s1": {"arm": "softmax", "preset": "tiny", "seed": 1, "steps": 10, "checkpoint_hash": "h-a1"},
    "tiny-b": {"arm": "vga", "preset": "tiny", "seed": 0, "steps": 10, "checkpoint_hash": "h-b0"},
}
# The part of a scheme's JSON (a record's config.scheme) that the report reads.
SCHEME_SPECS = {
    "fp32": {"backend": "reference", "weight_bits": None, "activation_bits": None, "options": {}},
    "w8a8-pt": {"backend": "static", "weight_bits": 8, "activation_bits": 8, "options": {}},
    "w8a8-dyn": {"backend": "simulated", "weight_bits": 8, "activation_bits": 8, "options": {}},
}


def planner_facts(model: str, spec: dict) -> dict:
    """The `facts` a record written by the planner carries (model facts from the zoo entry)."""
    entry = ZOO.get(model) or {}
    return {"model": {"arm": entry.get("arm"), "preset": entry.get("preset")},
            "scheme": {"backend": spec["backend"], "weight_bits": spec["weight_bits"],
                       "activation_bits": spec["activation_bits"], "kv_bits": None, "attention_kernel": False}}


def put(store, model, scheme, task, metrics, draw=None, checkpoint=None, protocol="p1", facts=True):
    """A record as the planner writes it (`facts=True`) or as older records are (no facts)."""
    spec = SCHEME_SPECS.get(scheme, SCHEME_SPECS["w8a8-pt"])
    config = {"model": {"name": model, "checkpoint_hash": checkpoint or ZOO.get(model, {}).get("checkpoint_hash", "x")},
              "scheme": json.dumps({"name": scheme, **spec}, sort_keys=True), "task": task, "protocol": protocol,
              "calibration_seed": draw}
    store.put(make_record(model, scheme, task, metrics, protocol=protocol, config=config,
                          facts=planner_facts(model, spec) if facts else None))


def fill(store, facts=True):
    """Two seeds x three draws of w8a8-pt on the softmax arm, two draws on vga, a task record."""
    def add(*args, **kwargs):
        put(store, *args, facts=facts, **kwargs)

    add("tiny-a", "fp32", "ppl", {"ppl": 10.0})
    add("tiny-a-s1", "fp32", "ppl", {"ppl": 20.0})
    add("tiny-b", "fp32", "ppl", {"ppl": 40.0})
    for draw, (a, a1) in enumerate([(10.1, 20.6), (10.3, 20.2), (10.2, 20.4)]):  # 2 seeds x 3 draws
        add("tiny-a", "w8a8-pt", "ppl", {"ppl": a}, draw)
        add("tiny-a-s1", "w8a8-pt", "ppl", {"ppl": a1}, draw)
    add("tiny-b", "w8a8-pt", "ppl", {"ppl": 39.9}, 0)
    add("tiny-b", "w8a8-pt", "ppl", {"ppl": 40.3}, 1)  # one below fp32, one above: range holds 0
    add("tiny-a", "w8a8-dyn", "ppl", {"ppl": 10.05})
    add("tiny-a", "w8a8-dyn", "qbench_agreement", {"accuracy": 0.8, "flip_rate": 0.02})
    add("tiny-a", "fp32", "probes", {"sink_rate@0.3": 5.0, "max_inf_norm": 6.0, "kurtosis_mean": 3.2,
                                     "massive_activation_max": 12.0}, protocol="probes")
    return store


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(qbench.zoo, "read_zoo", lambda *a, **k: ZOO)
    return fill(ResultStore(tmp_path / "store"))


def cells_by(store):
    cells = headline_matrix(matrix_values(store.records(), ZOO))
    return {(c["arm"], c["scheme"]): c for c in cells.to_dict("records")}


def test_matrix_values_equal_the_per_model_tables(store):
    table = comparison_table(store.records()).set_index(["model", "scheme"])
    cells = cells_by(store)
    # the per-model table averages draws; the matrix then averages seeds (equal draws per seed)
    per_seed = [table.loc[(m, "w8a8-pt"), "rel_delta_%"] for m in ("tiny-a", "tiny-a-s1")]
    assert cells[("softmax", "w8a8-pt")]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert cells[("vga", "w8a8-pt")]["mean"] == pytest.approx(table.loc[("tiny-b", "w8a8-pt"), "rel_delta_%"])
    assert cells[("softmax", "w8a8-dyn")]["mean"] == pytest.approx(table.loc[("tiny-a", "w8a8-dyn"), "rel_delta_%"])


def test_seeds_and_draws_fold_with_the_right_n_and_spread(store):
    cells = cells_by(store)
    softmax = cells[("softmax", "w8a8-pt")]
    values = [1.0, 3.0, 2.0, 3.0, 1.0, 2.0]  # % of 10 and of 20, per draw and seed
    assert softmax["n"] == 6 and softmax["seeds"] == 2
    assert softmax["std"] == pytest.approx(float(__import__("statistics").stdev(values)))
    assert (softmax["min"], softmax["max"]) == pytest.approx((1.0, 3.0))
    vga = cells[("vga", "w8a8-pt")]
    assert vga["n"] == 2 and vga["min"] < 0 < vga["max"]
    assert cells[("softmax", "w8a8-dyn")]["flip_rate"] == pytest.approx(0.02)


def test_report_puts_the_matrix_first_and_marks_overlap_with_zero(store):
    _, report = write_report(store, zoo=ZOO)
    text = report.read_text()
    first_screen = "\n".join(text.splitlines()[:12])
    assert "representative schemes" in first_screen and "tiny · softmax" in first_screen and "tiny · vga" in first_screen
    assert max(len(line) for line in first_screen.splitlines() if line.startswith("|")) <= 120
    assert "| +2.0 |" in first_screen  # the mean, 2%
    assert "| ~+0.25 |" in first_screen  # the vga cell's range holds 0
    # the full matrix, folded below: mean ± sample std (n records) and the flip rate
    folded = text[text.index("<details>"):]
    assert "+2.0±0.89 (6)" in folded  # mean 2%, sample std 0.894, n = 6
    assert "~+0.25±0.71 (2)" in folded
    assert "f2.0%" in folded
    assert (store.root / "plots" / "headline_matrix.png").stat().st_size > 1000
    assert text.index("The five worst cells") < text.index("Extreme tokens") < text.index("Per model: tiny-a")


def test_changed_checkpoint_is_a_separate_row(store):
    put(store, "tiny-b", "fp32", "ppl", {"ppl": 3000.0}, checkpoint="deadbeefcafe")
    put(store, "tiny-b", "w8a8-pt", "ppl", {"ppl": 3300.0}, 0, checkpoint="deadbeefcafe")
    labelled = label_checkpoints(store.records(), ZOO)
    assert {r["model"] for r in labelled} == {"tiny-a", "tiny-a-s1", "tiny-b", "tiny-b@deadbeef"}
    table = comparison_table(labelled).set_index(["model", "scheme"])
    assert table.loc[("tiny-b", "w8a8-pt"), "n"] == 2  # the good checkpoint's two draws only
    assert table.loc[("tiny-b@deadbeef", "w8a8-pt"), "rel_delta_%"] == pytest.approx(10.0)


def test_models_and_schemes_narrow_the_report(store, capsys):
    _, report = write_report(store, zoo=ZOO, models="tiny-b*", schemes=["w8a8-pt"])
    text = report.read_text()
    assert "tiny · vga" in text and "tiny · softmax" not in text and "w8a8-dyn" not in text
    assert main(["compare", "--models", "tiny-a*", "--results", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "tiny · softmax" in out and "+2.0±0.89 (6)" in out and "tiny · vga" not in out


def test_empty_and_fp32_only_stores_give_one_line_and_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qbench.zoo, "read_zoo", lambda *a, **k: ZOO)
    empty = tmp_path / "empty"
    assert main(["report", "--results", str(empty)]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no records" in err
    fp_only = ResultStore(tmp_path / "fp")
    put(fp_only, "tiny-a", "fp32", "ppl", {"ppl": 10.0})
    assert main(["report", "--results", str(fp_only.root)]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only fp32" in err
    assert not (fp_only.root / "REPORT.md").exists() and not (fp_only.root / "summary.csv").exists()


def test_html_report_is_self_contained_and_escaped(store, tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    put(store, evil, "fp32", "ppl", {"ppl": 10.0})
    put(store, evil, "w8a8-pt", "ppl", {"ppl": 11.0}, 0)
    _, report = write_report(store, zoo=ZOO, fmt="html")
    html = report.read_text()
    assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'id="matrix"' in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html and 'src="plots/' not in html
    assert "<details>" in html and "<script>" in html


def test_report_writes_atomically_and_keeps_the_old_file_on_failure(store, monkeypatch):
    import qbench.results as results

    _, report = write_report(store, zoo=ZOO)
    before = report.read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "replace", full_disk)
    assert main(["report", "--results", str(store.root)]) == 5
    assert report.read_text() == before and (store.root / "summary.csv").stat().st_size > 0
    assert not list(store.root.glob(".*.tmp"))


def test_records_without_facts_land_where_the_planners_records_do(tmp_path):
    """Older records (no `facts`: scheme facts from the config's scheme JSON, model facts
    from the zoo) give the same matrix, cell for cell, as records that carry facts."""
    with_facts = headline_matrix(matrix_values(fill(ResultStore(tmp_path / "new")).records(), ZOO))
    without = fill(ResultStore(tmp_path / "old"), facts=False).records()
    assert not any("facts" in r for r in without)
    assert headline_matrix(matrix_values(without, ZOO)).equals(with_facts)
    for r in without:
        assert scheme_facts(r) == planner_facts(r["model"], SCHEME_SPECS[r["scheme"]])["scheme"]


def test_a_records_facts_place_it_not_its_name(tmp_path):
    """A scheme and a model unknown to every registry are placed by the record's facts: a
    4-bit scheme joins the 6/4-bit matrix, a model outside the zoo the row of its preset and
    arm; columns go by group, widest first, then name; rows softmax first, then arms by name."""
    store = ResultStore(tmp_path / "store")
    fill(store)
    spec = {"backend": "made-up", "weight_bits": 4, "activation_bits": None, "options": {}}
    for model, ppl in (("elsewhere-z", 10.0), ("elsewhere-z", 10.5), ("tiny-a", 10.4)):
        scheme = "fp32" if ppl == 10.0 else "zz-w4-new"
        config = {"model": {"name": model, "checkpoint_hash": "z"}, "scheme": f"{scheme}, not a scheme's JSON",
                  "task": "ppl", "protocol": "p1"}
        facts = {"model": {"arm": "aaa", "preset": "tiny"} if model == "elsewhere-z" else planner_facts(model, spec)["model"],
                 "scheme": planner_facts(model, SCHEME_SPECS["fp32"] if scheme == "fp32" else spec)["scheme"]}
        store.put(make_record(model, scheme, "ppl", {"ppl": ppl}, protocol="p1", config=config, facts=facts))
    cells = headline_matrix(matrix_values(store.records(), ZOO))
    new = cells[cells.scheme == "zz-w4-new"]
    assert set(new.group) == {2} and set(new.width) == {4}
    assert set(zip(new.family, new.arm)) == {("tiny", "aaa"), ("tiny", "softmax")}
    rows = list(dict.fromkeys(zip(cells.family, cells.arm)))
    assert rows == [("tiny", "softmax"), ("tiny", "aaa"), ("tiny", "vga")]
    columns = list(dict.fromkeys(cells.scheme))
    assert columns == ["w8a8-dyn", "w8a8-pt", "zz-w4-new"]


def test_committed_records_carry_the_facts_the_planner_writes():
    """Every committed record carries facts (`qbench migrate` derived them for the older ones
    from the scheme JSON in their config and the zoo), equal to what the planner writes from
    the registered scheme object of that name and the model's resolved reference; and the
    report's own derivation for a record without facts gives the same."""
    from qbench.paths import REPO_ROOT
    from qbench.plan import cell_facts
    from qbench.quant import SCHEMES
    from qbench.report.facts import model_facts
    from qbench.zoo import read_zoo, resolve_model

    zoo, refs, seen = read_zoo(), {}, set()
    for path in sorted((REPO_ROOT / "results" / "records").glob("*.json")):
        record = json.loads(path.read_text())
        assert "facts" in record, path.name
        bare = {k: v for k, v in record.items() if k != "facts"}
        assert {"model": model_facts(bare, zoo), "scheme": scheme_facts(bare)} == record["facts"], path.name
        name = record["model"].split("@", 1)[0]
        if record["scheme"] in SCHEMES and name not in seen:  # one record per model: resolving hashes weights
            refs[name] = refs.get(name) or resolve_model(name)
            assert cell_facts(refs[name], SCHEMES[record["scheme"]]) == record["facts"], path.name
            seen.add(name)
        if record["scheme"] in SCHEMES:
            assert cell_facts(refs[name], SCHEMES[record["scheme"]])["scheme"] == record["facts"]["scheme"], path.name
    assert len(seen) > 40


def test_writing_the_report_imports_neither_quant_nor_modeling(tmp_path):
    """In a fresh interpreter: `qbench report` over a small store loads no qbench.quant and
    no qbench.modeling module (`import qbench` itself loads neither)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "zoo.yaml").write_text(yaml.safe_dump({"models": ZOO}))
    store = fill(ResultStore(tmp_path / "store"), facts=False)
    code = """if True:
        import json, sys
        import qbench
        before = {m for m in sys.modules if m.startswith("qbench.modeling")}
        assert not before, before
        from qbench.cli import main
        code = main(["report", "--results", sys.argv[1]])
        loaded = sorted(m for m in sys.modules if m.startswith(("qbench.quant", "qbench.modeling")) and m not in before)
        print(json.dumps({"exit": code, "loaded": loaded}))
    """
    env = {**os.environ, "QBENCH_MODELS": str(models), "PYTHONPATH": str(Path(qbench.zoo.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", code, str(store.root)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"exit": 0, "loaded": []}
    assert "tiny · softmax" in (store.root / "REPORT.md").read_text()


def put_failed(store, model, scheme, error):
    spec = SCHEME_SPECS.get(scheme, SCHEME_SPECS["w8a8-pt"])
    config = {"model": {"name": model, "checkpoint_hash": ZOO[model]["checkpoint_hash"]},
              "scheme": json.dumps({"name": scheme, **spec}, sort_keys=True), "task": "ppl", "protocol": "p1"}
    store.put(make_record(model, scheme, "ppl", {}, protocol="p1", status="failed", config=config,
                          facts=planner_facts(model, spec), error=error))


def test_a_failed_cells_reason_shows_in_report_html_and_compare(store, capsys):
    """tiny-b under w8a8-dyn failed: its matrix cell reads `failed:nonfinite` (not `-`), the
    legend says what that means, and the full message is in the failed-cells table."""
    put_failed(store, "tiny-b", "w8a8-dyn", "NonFiniteError: non-finite logits (12 values) under protocol p1")
    _, report = write_report(store, zoo=ZOO)
    text = report.read_text()
    assert "failed:nonfinite" in text and "`nonfinite` NaN/inf logits" in text
    assert "Failed cells (1): why" in text and "non-finite logits (12 values)" in text
    _, page = write_report(store, zoo=ZOO, fmt="html")
    assert "failed:nonfinite" in page.read_text() and "non-finite logits (12 values)" in page.read_text()
    assert main(["compare", "--results", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "failed:nonfinite" in out and "non-finite logits (12 values)" in out
    # a later success replaces the failure everywhere
    put(store, "tiny-b", "w8a8-dyn", "ppl", {"ppl": 40.0})
    assert "failed:" not in write_report(store, zoo=ZOO)[1].read_text()


def test_sweep_prints_each_failed_cell_with_its_reason(monkeypatch, capsys, tmp_path):
    import qbench.plan
    import qbench.sweep

    suite = tmp_path / "s.yaml"
    suite.write_text("models: [tiny-a]\nschemes: [w8a8-dyn]\n")
    failed = {"model": "tiny-a", "scheme": "w8a8-dyn", "task": "ppl", "protocol": "p1", "status": "failed",
              "error": "ValueError: none of the known model families (qbench, llama, gpt2)"}
    monkeypatch.setattr(qbench.sweep, "run_sweep", lambda *a, **k: {"cells": 1, "failed": 1, "failed_records": [failed]})
    assert main(["sweep", str(suite), "--results", str(tmp_path / "r")]) == 1
    out = capsys.readouterr().out
    assert "failed cells (1):" in out and "tiny-a w8a8-dyn ppl: family: ValueError: none of the known" in out
