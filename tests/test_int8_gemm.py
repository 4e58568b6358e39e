"""The real int8 W8A8 path: every available kernel equals the exact integer product within
fp32 rounding, the per-machine choice is cached and recorded, and the layer matches the
simulated W8A8 layer."""
import json

import pytest
import torch

from qbench.quant import int8_gemm
from qbench.quant.int8_gemm import CANDIDATES, EXACT_TOLERANCE, Int8Gemm, available, exactness_error
from qbench.quant.simulated import DynamicQuantLinear

AVAILABLE = [k for k in CANDIDATES if available(k)]


@pytest.mark.parametrize("kernel", AVAILABLE)
def test_kernel_equals_exact_integer_reference(kernel):
    """Adversarial codes (all +-127: AVX2's int16 pair sums would saturate) and K > 1024."""
    assert exactness_error(kernel) <= EXACT_TOLERANCE


@pytest.mark.parametrize("kernel", AVAILABLE)
def test_real_int8_layer_equals_the_simulated_layer(kernel):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 11, 96) * 3
    real = DynamicQuantLinear(linear, 8, 8, int8_matmul=True, kernel=kernel)
    simulated = DynamicQuantLinear(linear, 8, 8, int8_matmul=False)
    with torch.no_grad():
        torch.testing.assert_close(real(x), simulated(x), rtol=1e-5, atol=1e-5)
    assert real.kernel == kernel and kernel in repr(real)


def test_choice_is_measured_once_per_cpu_and_forced_by_env(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(int8_gemm, "_choice", None)
    calls = []
    real_measure = int8_gemm.measure
    monkeypatch.setattr(int8_gemm, "measure", lambda: calls.append(1) or real_measure(tokens=16, repeats=1))
    kernel = int8_gemm.choose()
    assert kernel in AVAILABLE and calls == [1]
    cached = json.loads((tmp_path / "int8_gemm.json").read_text())
    [entry] = cached.values()
    assert entry["kernel"] == kernel and entry["signature"]["cpu"] and entry["candidates"][kernel]["exact"]
    monkeypatch.setattr(int8_gemm, "_choice", None)
    assert int8_gemm.choose() == kernel and calls == [1]  # read from the cache, not measured again
    monkeypatch.setenv("QBENCH_INT8_GEMM", "fp32-exact")
    assert int8_gemm.choose() == "fp32-exact"
    monkeypatch.setenv("QBENCH_INT8_GEMM", "nope")
    with pytest.raises(ValueError, match="QBENCH_INT8_GEMM"):
        int8_gemm.choose()


def test_the_cell_records_which_kernel_ran(monkeypatch):
    from qbench.quant import quantize

    monkeypatch.setenv("QBENCH_INT8_GEMM", "fp32-exact")
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
    model.get_output_embeddings = lambda: model[1]
    facts = quantize(model, "w8a8-dyn-int8")
    assert facts["int8_kernel"] == "fp32-exact" and facts["quantized_linears"] == 1


def test_unknown_kernel_is_an_error():
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        Int8Gemm("nope", torch.zeros(2, 2, dtype=torch.int8), torch.ones(2))
