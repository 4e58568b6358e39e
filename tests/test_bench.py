import json
import math

import pytest
import torch

import qbench.runner as bench
from qbench.runner import run_bench
from qbench.cli import main
from qbench.eval import PerplexityProtocol, evaluate_perplexity
from qbench.report import comparison_table, write_report
from qbench.results import ResultStore
from qbench.zoo import CheckpointError, load_model, read_zoo

LIMIT = 3000


def test_bench_writes_one_record_per_cell_with_provenance(micro_checkpoint, tmp_path):
    store = ResultStore(tmp_path / "results")
    records = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl"], store, limit=LIMIT, progress=False)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert len(list(store.records_dir.glob("*.json"))) == 2
    record = records[1]
    assert record["scheme"] == "w8a8-dyn" and "name" not in json.loads(record["config"]["scheme"])  # prose-free key
    assert record["config"]["data_hash"] and record["config"]["model"]["checkpoint_hash"]
    provenance = record["provenance"]
    assert provenance["libraries"]["torch"] and "cpu" in provenance["machine"]
    assert "git_sha" in provenance and provenance["wall_seconds"] > 0
    assert record["protocol"].startswith("nonoverlap-w64-bos-") and record["protocol"].endswith(f"-first{LIMIT}c")
    table = comparison_table(records)
    fp, q = table.iloc[0], table.iloc[1]
    assert fp.scheme == "fp32" and fp.delta_ppl == 0
    assert q.delta_ppl == pytest.approx(q.ppl - fp.ppl)
    assert math.isfinite(q.ppl) and q.ppl != fp.ppl


def test_records_carry_their_model_and_scheme_facts_outside_the_key(micro_checkpoint, tmp_path):
    """Every record, failed ones too, says what the report needs (arm, preset, backend and
    bits) without the report importing the registries; the facts are not in the key."""
    from qbench.runner import failed_record
    from qbench.plan import plan_cells
    from qbench.results import cell_key, validate_record

    store = ResultStore(tmp_path / "results")
    [fp, dyn, attn] = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn", "w8a8-attn"], ["ppl"], store,
                                limit=LIMIT, progress=False)
    model = {"arm": "vga", "preset": "micro"}  # from the checkpoint's training info (no zoo entry)
    assert fp["facts"] == {"model": model, "scheme": {"backend": "reference", "weight_bits": None,
                                                      "activation_bits": None, "kv_bits": None,
                                                      "attention_kernel": False}}
    assert dyn["facts"]["scheme"] == {"backend": "simulated", "weight_bits": 8, "activation_bits": 8,
                                      "kv_bits": None, "attention_kernel": False}
    assert attn["facts"]["scheme"]["attention_kernel"] is True
    assert all(r["key"] == cell_key(r["config"]) and "facts" not in r["config"] for r in (fp, dyn, attn))
    [planned] = plan_cells([str(micro_checkpoint)], ["w4a8"], ["ppl"], limit=LIMIT, calibration_seeds=[1])
    failed = failed_record(planned, "WorkerDied: test")
    assert failed["facts"]["scheme"] == {"backend": "static", "weight_bits": 4, "activation_bits": 8,
                                         "kv_bits": None, "attention_kernel": False}
    assert failed["facts"]["model"] == model and validate_record(failed, failed["key"]) is None
    from qbench.plan import cell_facts
    from qbench.quant import get_scheme

    assert cell_facts(planned.model_ref, get_scheme("kv4"))["scheme"]["kv_bits"] == 4
    bad = {**failed, "facts": {**failed["facts"], "scheme": {**failed["facts"]["scheme"], "weight_bits": "4"}}}
    assert "facts.scheme.weight_bits" in validate_record(bad, bad["key"])


def test_rerun_skips_existing_cells_and_recomputes_corrupt_or_missing(micro_checkpoint, tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results")
    first = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl"], store, limit=LIMIT, progress=False)
    computed = []
    real_run_cell = bench.run_cell

    def counting_run_cell(loaded, planned, progress, *rest):
        computed.append(planned.cell.scheme.name)
        return real_run_cell(loaded, planned, progress, *rest)

    monkeypatch.setattr(bench, "run_cell", counting_run_cell)
    import qbench.zoo

    real_load = qbench.zoo.ModelRef.load
    monkeypatch.setattr(qbench.zoo.ModelRef, "load", lambda self: pytest.fail("weights loaded for a complete rerun"))
    again = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl"], store, limit=LIMIT, progress=False)
    assert computed == [] and [r["metrics"]["ppl"] for r in again] == [r["metrics"]["ppl"] for r in first]
    monkeypatch.setattr(qbench.zoo.ModelRef, "load", real_load)

    store.path(first[1]["key"]).write_text('{"key": "truncated')  # a corrupt record
    store.path(first[0]["key"]).unlink()  # a missing one (killed before it was written)
    assert len(store.corrupt()) == 1
    third = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl"], store, limit=LIMIT, progress=False)
    assert sorted(computed) == ["fp32", "w8a8-dyn"]
    assert [r["metrics"]["ppl"] for r in third] == [r["metrics"]["ppl"] for r in first]  # deterministic
    assert store.corrupt() == []


def test_interrupted_run_keeps_finished_cells(micro_checkpoint, tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "results")
    real_run_cell = bench.run_cell

    def crash_on_second(loaded, planned, progress, *rest):
        if planned.cell.scheme.name == "w8a8-dyn":
            raise KeyboardInterrupt
        return real_run_cell(loaded, planned, progress, *rest)

    monkeypatch.setattr(bench, "run_cell", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl"], store, limit=LIMIT, progress=False)
    assert len(store.records()) == 1
    monkeypatch.setattr(bench, "run_cell", real_run_cell)
    records = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn"], ["ppl"], store, limit=LIMIT, progress=False)
    assert len(store.records()) == 2 and all(r["status"] == "ok" for r in records)


def test_nan_after_quantization_is_a_failed_record_not_a_number(micro_checkpoint, tmp_path, monkeypatch):
    import qbench.quant as quant

    def poisoned_quantize(model, scheme, calibration=None):
        facts = quant.quantize(model, scheme, calibration)
        model.model.layers[0].mlp.fc1.bias.data.fill_(float("nan"))
        return facts

    monkeypatch.setattr(bench, "quantize", poisoned_quantize)
    store = ResultStore(tmp_path / "results")
    records = run_bench([str(micro_checkpoint)], ["w8a8-dyn"], ["ppl"], store, limit=LIMIT, progress=False)
    assert records[0]["status"] == "failed" and "non-finite" in records[0]["error"]
    assert "metrics" not in records[0]


def test_bench_errors_name_the_problem(micro_checkpoint, tmp_path):
    store = ResultStore(tmp_path / "results")
    with pytest.raises(KeyError, match="did you mean 'w8a8-dyn'"):
        run_bench([str(micro_checkpoint)], ["w8a8-dyn2"], ["ppl"], store)
    with pytest.raises(KeyError, match="unknown task 'pll' .*did you mean 'ppl'"):
        run_bench([str(micro_checkpoint)], ["fp32"], ["pll"], store)
    with pytest.raises(CheckpointError, match="unknown model 'tiny-vgaa'"):
        run_bench(["tiny-vgaa"], ["fp32"], ["ppl"], store)


def test_checkpoint_errors_name_the_file(micro_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(micro_checkpoint, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_model(str(broken))
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(str(broken))
    weights.write_bytes(data)
    config = json.loads((broken / "config.json").read_text())
    config["d_ff"] = 256
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(str(broken))
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(str(broken))


def test_cli_bench_prints_table_and_report_writes_files(micro_checkpoint, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["bench", "--model", str(micro_checkpoint), "--schemes", "fp32,w8a8-dyn", "--limit", str(LIMIT),
                 "--results", str(results), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "delta_ppl" in out and "w8a8-dyn" in out
    assert main(["report", "--results", str(results)]) == 0
    report = (results / "REPORT.md").read_text()
    assert "| fp32" in report and "w8a8-dyn" in report
    assert (results / "summary.csv").read_text().startswith("model,scheme")
    assert main(["bench", "--model", str(micro_checkpoint), "--schemes", "fp33", "--results", str(results)]) == 2
    assert "did you mean 'fp32'" in capsys.readouterr().err


def test_word_and_byte_perplexity_share_the_token_nll(micro_checkpoint):
    loaded = load_model(str(micro_checkpoint))
    result = evaluate_perplexity(loaded.model, loaded.tokenizer, PerplexityProtocol(window=64, max_chars=LIMIT))
    assert math.log(result["ppl"]) * result["tokens"] == pytest.approx(result["nll_sum"])
    assert math.log(result["word_ppl"]) * result["words"] == pytest.approx(result["nll_sum"])
    assert math.log(result["byte_ppl"]) * result["bytes"] == pytest.approx(result["nll_sum"])
    assert result["bytes"] >= LIMIT * 0.9 and result["windows"] == math.ceil(result["tokens"] / 63)


def test_kl_and_top1_against_full_precision(micro_checkpoint):
    import copy

    from qbench.quant import quantize

    loaded = load_model(str(micro_checkpoint))
    protocol = PerplexityProtocol(window=64, max_chars=LIMIT)
    same = evaluate_perplexity(copy.deepcopy(loaded.model), loaded.tokenizer, protocol, reference=loaded.model)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    quantized = copy.deepcopy(loaded.model)
    quantize(quantized, "w6a6", lambda n, seed, bs: [torch.randint(3, 320, (bs, 64)) for _ in range(n)])
    result = evaluate_perplexity(quantized, loaded.tokenizer, protocol, reference=loaded.model)
    assert result["kl"] > 1e-5 and 0.5 < result["top1_agreement"] < 1.0


def test_report_aggregates_hand_made_records(tmp_path):
    """Delta against the fp32 row of the same model and protocol; probes joined in."""
    from record_factory import make_record

    store = ResultStore(tmp_path)

    def put(model, scheme, task, metrics, protocol="p1"):
        store.put(make_record(model, scheme, task, metrics, protocol=protocol))

    put("a", "fp32", "ppl", {"ppl": 10.0})
    put("a", "w8a8-pt", "ppl", {"ppl": 12.5, "kl": 0.1, "top1_agreement": 0.9})
    put("b", "fp32", "ppl", {"ppl": 20.0})
    put("c", "fp32", "ppl", {"ppl": 30.0})
    for seed, ppl in enumerate([31.0, 33.0, 35.0]):  # three calibration draws
        store.put(make_record("c", "w8a8-pt", "ppl", {"ppl": ppl}, protocol="p1", calibration_seed=seed))
    put("b", "w8a8-pt", "ppl", {"ppl": 21.0, "kl": 0.05, "top1_agreement": 0.95})
    put("a", "fp32", "probes", {"max_inf_norm": 7.0, "kurtosis_mean": 3.5, "sink_rate@0.3": 25.0,
                                "first_token_share_mean": 0.4}, protocol="probes")
    table = comparison_table(store.records()).set_index(["model", "scheme"])
    assert table.loc[("a", "w8a8-pt"), "delta_ppl"] == pytest.approx(2.5)
    assert table.loc[("a", "w8a8-pt"), "rel_delta_%"] == pytest.approx(25.0)
    assert table.loc[("b", "w8a8-pt"), "rel_delta_%"] == pytest.approx(5.0)
    assert table.loc[("a", "fp32"), "kl"] == 0.0 and table.loc[("a", "fp32"), "sink_rate@0.3"] == 25.0
    assert table.loc[("c", "w8a8-pt"), "n"] == 3 and table.loc[("c", "w8a8-pt"), "ppl"] == pytest.approx(33.0)
    assert table.loc[("c", "w8a8-pt"), "ppl_std"] == pytest.approx(2.0)  # sample std of 31, 33, 35
    assert table.loc[("c", "w8a8-pt"), "delta_ppl"] == pytest.approx(3.0)
    summary, report = write_report(store, zoo=read_zoo())
    text = report.read_text()
    assert "<summary>Per scheme: w8a8-pt</summary>" in text and "plots/delta_ppl.png" in text  # folded details and (tmp_path / "plots" / "delta_ppl.png").exists()
    assert main(["compare", "--models", "a,b", "--scheme", "w8a8-pt", "--results", str(tmp_path)]) == 0
    assert main(["report", "--results", str(tmp_path), "--format", "html"]) == 0
    assert (tmp_path / "REPORT.html").exists()


def test_calibration_seeds_make_one_cell_per_draw(micro_checkpoint, tmp_path):
    store = ResultStore(tmp_path / "results")
    records = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-pt"], ["ppl"], store, limit=LIMIT, progress=False,
                        calibration_seeds=[0, 1])
    assert [(r["scheme"], r["calibration_seed"]) for r in records] == [("fp32", None), ("w8a8-pt", 0), ("w8a8-pt", 1)]
    assert records[1]["key"] != records[2]["key"]
    assert records[1]["metrics"]["ppl"] != records[2]["metrics"]["ppl"]  # different calibration batches
    row = comparison_table(records).set_index("scheme").loc["w8a8-pt"]
    assert row["n"] == 2 and row["ppl_std"] > 0
