"""Scheme facts live in the scheme registry: a weight method or a backend is one module plus
its registration, and bench, the report and recheck take a new one from there (no list of
scheme names anywhere else); importing qbench.quant loads no optional package."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qbench
from qbench.quant import SCHEMES, Scheme
from qbench.quant.handlers import REGISTRY, register
from qbench.quant.scheme import register as register_scheme
from qbench.quant.scheme import scheme_info, unregister
from qbench.quant.surgery import quantizable_linears
from qbench.quant.weight_only import WEIGHT_METHODS, register_weight_method
from qbench.scheme_catalog import CATALOG, SCREEN_COLUMNS, screen_columns

LIMIT = 3000
OPTIONAL_PACKAGES = ("bitsandbytes", "optimum", "torchao", "hqq", "gguf", "lm_eval", "transformers")


def test_importing_quant_and_resolving_every_scheme_loads_no_optional_package():
    """In a fresh interpreter: the registry, every scheme and what it says of itself
    (scheme_info) without bitsandbytes, quanto, torchao, hqq, gguf, lm-eval or
    transformers (which loads hqq and torchao); quantizing with a scheme that needs one
    loads it then."""
    code = """if True:
        import json, sys
        from qbench.quant import SCHEMES
        from qbench.quant.scheme import scheme_info
        infos = [scheme_info(s) for s in SCHEMES.values()]
        print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))))
    """
    env = {**os.environ, "PYTHONPATH": str(Path(qbench.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", code, *OPTIONAL_PACKAGES], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_every_named_weight_method_is_registered_by_its_module():
    from qbench.quant.weight_only import METHOD_MODULES, get_weight_method

    for name, module in METHOD_MODULES.items():
        method = get_weight_method(name)
        assert method.name == name and method.weights.__module__ == module
    with pytest.raises(ValueError, match="unknown weight method 'gtpq'.*did you mean 'gptq'"):
        get_weight_method("gtpq")


def test_scheme_info_comes_from_the_handlers_and_the_catalogue():
    gptq, quanto, sq = scheme_info("w4-gptq-g64"), scheme_info("quanto-w4"), scheme_info("w8a8-pt-sq")
    assert (gptq.family, gptq.label, gptq.slow, gptq.packages) == ("GPTQ", "GPTQ g64", True, ())
    assert "screen:best 4b PTQ" in gptq.tags and gptq.bits == {"weights": 4, "activations": None, "kv_cache": None}
    assert (quanto.slow, quanto.packages) == (True, ("optimum.quanto",))
    assert (sq.family, sq.label, sq.slow) == ("smoothquant + static", "+ SmoothQuant", False)
    assert scheme_info("w4-hqq-g64").packages == ("hqq",) and scheme_info("kv2").bits["kv_cache"] == 2
    assert list(CATALOG) == list(SCHEMES)  # the registry is built from the catalogue, in its order
    assert [column for column, _ in screen_columns()] == list(SCREEN_COLUMNS)
    assert all(schemes for _, schemes in screen_columns())  # every first-screen column is some scheme's tag


def test_every_package_a_scheme_needs_is_in_the_records_provenance():
    """A record's provenance names the version of each library a scheme may need (its
    handlers' `package`, by import name; the distribution found from the installed ones)."""
    from importlib.metadata import packages_distributions

    from qbench.record import TRACKED_LIBRARIES

    distributions = packages_distributions()
    needed = {package for scheme in SCHEMES.values() for package in scheme_info(scheme).packages}
    assert needed >= {"bitsandbytes", "optimum.quanto", "hqq", "torchao"}
    for package in needed:
        found = distributions.get(package.split(".")[0], [])
        assert set(found) & set(TRACKED_LIBRARIES), (package, found)


def test_the_catalogues_kv_cache_options_are_a_kv_cache_specs_whole_form():
    """qbench.scheme_catalog writes options["kv_cache"] without importing the KV code: each
    must be what KVCacheSpec writes itself (every field, so the key is the same)."""
    from qbench.quant.kvcache import KVCacheSpec

    specs = [entry.fields["options"]["kv_cache"] for entry in CATALOG.values()
             if "kv_cache" in entry.fields.get("options", {})]
    assert len(specs) == 15
    for options in specs:
        assert KVCacheSpec.from_options(options).to_options() == options


def test_attention_kernel_is_an_option_of_the_simulated_backend_only():
    import dataclasses

    from qbench.quant import get_scheme

    kernel = get_scheme("w8a8-attn").options["attention_kernel"]
    for name in ("w8a8-pt", "w4-rtn-g64", "fp32", "llm-int8"):
        scheme = get_scheme(name)
        with pytest.raises(ValueError, match=r"no handler reads option\(s\) \['attention_kernel'\]"):
            dataclasses.replace(scheme, options={**scheme.options, "attention_kernel": kernel})


@pytest.fixture
def dummy_method_and_backend():
    """A weight method (sign of each weight times the row's mean magnitude) and a backend
    (symmetric per-tensor round-to-nearest weights), each registered as its module would
    register it, with a scheme of each."""
    @register_weight_method("test-sign", family="sign test")
    def sign_weights(model, linears, scheme, batches):
        return {name: torch.sign(lin.weight.detach()) * lin.weight.detach().abs().mean(dim=1, keepdim=True)
                for name, lin in linears}, {}

    @register("backend", "test-per-tensor", fields=("weight_bits", "weight_granularity"), family="per-tensor test")
    def per_tensor_weights(model, scheme, calibration=None):
        linears = quantizable_linears(model)
        qmax = 2 ** (scheme.weight_bits - 1) - 1
        with torch.no_grad():
            for _, linear in linears:
                scale = linear.weight.abs().max() / qmax
                linear.weight.copy_(torch.round(linear.weight / scale) * scale)
        return {"quantized_linears": len(linears)}

    method = register_scheme(Scheme("w2-test-sign", "weight_only", "sign weights", weight_bits=2,
                                    weight_granularity="per_channel", options={"method": "test-sign"}),
                             label="Sign", tags=("screen:best 4b PTQ",))
    backend = register_scheme(Scheme("w4-test-pt", "test-per-tensor", "per-tensor weights", weight_bits=4,
                                     weight_granularity="per_tensor"), label="PT W4")
    try:
        yield method, backend
    finally:
        for name in (method.name, backend.name):
            unregister(name)
        del WEIGHT_METHODS["test-sign"], REGISTRY["backend"]["test-per-tensor"]


def test_a_new_weight_method_and_backend_run_in_bench_report_and_recheck(dummy_method_and_backend, micro_checkpoint,
                                                                          tmp_path):
    from qbench.runner import run_bench
    from qbench.recheck import recheck_record, sample
    from qbench.report import write_report
    from qbench.results import ResultStore

    method, backend = dummy_method_and_backend
    assert (scheme_info(method).family, scheme_info(method).label) == ("sign test", "Sign")
    assert scheme_info(backend).family == "per-tensor test" and not scheme_info(backend).slow
    store = ResultStore(tmp_path / "results")
    records = run_bench([str(micro_checkpoint)], ["fp32", method.name, backend.name], ["ppl"], store, limit=LIMIT,
                        progress=False)
    assert [r["status"] for r in records] == ["ok"] * 3, [r.get("error") for r in records]
    fp, sign, per_tensor = (r["metrics"]["ppl"] for r in records)
    assert sign > fp and per_tensor != fp  # each ran: its weights are not the float ones
    assert records[1]["quantization"]["weight_method"] == "test-sign"
    assert records[2]["facts"]["scheme"]["backend"] == "test-per-tensor"
    # the report: the method's scheme in the first screen's column its tag names; the backend's
    # scheme a column of the full matrix (its group from its bits, 4)
    _, report = write_report(store, tmp_path / "out", zoo={})
    text = report.read_text()
    first_screen = text.split("## ", 2)[1]
    header = next(line for line in first_screen.splitlines() if line.startswith("| model"))
    assert "best 4b PTQ" in header and "w2-test-sign" in first_screen
    low_bits = text.split("Full matrix, 6- and 4-bit", 1)[1].split("</details>", 1)[0]
    assert backend.name in low_bits and method.name in low_bits
    # recheck: both are sampled (neither is slow) and recompute to the same numbers
    chosen = sample(store.records(), 9, seed=0)
    assert {method.name, backend.name} <= {r["scheme"] for r in chosen}
    for record in (records[1], records[2]):
        result = recheck_record(record)
        assert result.status == "ok", result.line()
