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
# oneDNN's u8 route is exact on VNNI-only CPUs and off by ~1e-4 under AMX (its zero-point
# compensation): a machine fact the chooser's check handles, tested below.
MACHINE_DEPENDENT = {"onednn-qlinear-u8"}
EXACT_EVERYWHERE = [k for k in AVAILABLE if k not in MACHINE_DEPENDENT]


@pytest.mark.parametrize("kernel", EXACT_EVERYWHERE)
def test_kernel_equals_exact_integer_reference(kernel):
    """Adversarial codes (all +-127: AVX2's int16 pair sums would saturate) and K > 1024."""
    assert exactness_error(kernel) <= EXACT_TOLERANCE


def test_an_inexact_kernel_is_measured_but_never_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(int8_gemm, "_choice", None)
    monkeypatch.setattr(int8_gemm, "CANDIDATES", ("onednn", "fp32-exact"))
    real_error = int8_gemm.exactness_error
    monkeypatch.setattr(int8_gemm, "exactness_error", lambda k: 1e-4 if k == "onednn" else real_error(k))
    monkeypatch.setattr(int8_gemm, "measure", lambda real=int8_gemm.measure: real(tokens=16, repeats=1))
    assert int8_gemm.choose() == "fp32-exact"
    [entry] = json.loads((tmp_path / "int8_gemm.json").read_text()).values()
    assert entry["candidates"]["onednn"] == {"available": True, "exact": False, "max_rel_error": 1e-4, "seconds": None}


@pytest.mark.parametrize("kernel", EXACT_EVERYWHERE)
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


def test_u8_and_qlinear_kernels_read_codes_in_their_own_dtype():
    """The layer hands each kernel its codes directly (no conversion pass): int8 for oneDNN's
    s8 routes, uint8 = code + 128 for the u8 route, float codes for the engines."""
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    for kernel in EXACT_EVERYWHERE:
        gemm = Int8Gemm(kernel, w, torch.ones(8))
        expected = {"onednn-qlinear-u8": (torch.uint8, 128), "fbgemm": (torch.float32, 0), "x86": (torch.float32, 0),
                    "fp32-exact": (torch.float32, 0)}.get(kernel, (torch.int8, 0))
        assert (gemm.input_dtype, gemm.zero_point) == expected
        codes = torch.randint(-127, 128, (5, 32), dtype=torch.int16)
        exact = (codes.double() @ w.double().t())
        got = gemm((codes + gemm.zero_point).to(gemm.input_dtype)).double()
        assert torch.equal(got, exact), kernel  # s_w = 1: the integer product itself


def test_the_fusion_check_catches_a_pass_that_rounds_differently():
    """The per-process check that guards the compiled quantizer: the eager function passes it,
    a quantizer off by one code at a tie does not."""
    from functools import partial

    from qbench.quant import int8_fused

    for per_token, zero_point, dtype in ((True, 0, torch.int8), (True, 128, torch.uint8), (False, 0, torch.float32)):
        eager = partial(int8_fused.quantize_rows, per_token=per_token, zero_point=zero_point, dtype=dtype)
        assert int8_fused.quantize_mismatch(eager, per_token, zero_point, dtype) is None

        def half_up(x, eager=eager):  # round half away from zero: differs only at exact ties
            codes, scale = eager(x)
            ties = (x / scale - torch.trunc(x / scale)).abs() == 0.5
            return torch.where(ties, codes + torch.sign(x).to(codes.dtype), codes), scale
        assert int8_fused.quantize_mismatch(half_up, per_token, zero_point, dtype) is not None


def test_an_input_read_by_several_layers_is_quantized_once_and_never_stale():
    from qbench.quant.int8_fused import SharedCodes

    calls = []
    shared = SharedCodes()
    quantize = lambda x: calls.append(1) or (x * 2, x.sum())  # noqa: E731
    x = torch.randn(4, 8)
    first = shared.get(x, ("a",), quantize)
    assert shared.get(x, ("a",), quantize) is first and len(calls) == 1  # q, k, v: one quantization
    assert shared.get(x.view(4, 8), ("a",), quantize) is first  # a view of the same storage, unchanged
    shared.get(x, ("b",), quantize)  # another quantizer
    assert len(calls) == 2
    x.add_(1.0)  # changed in place: the version counter moves
    assert torch.equal(shared.get(x, ("b",), quantize)[0], x * 2) and len(calls) == 3
    y = x.clone()  # equal values, another tensor
    shared.get(y, ("b",), quantize)
    assert len(calls) == 4


@pytest.mark.slow
def test_compiled_quantize_and_rescale_equal_eager_bit_for_bit(monkeypatch):
    """QBENCH_INT8_FUSION=compiled (the default outside tests): torch.compile's fused passes pass
    the check here, and the layer's output equals the eager one exactly."""
    from qbench.quant import int8_fused

    monkeypatch.setenv("QBENCH_INT8_FUSION", "compiled")
    monkeypatch.setattr(int8_fused, "_cache", {})
    assert int8_fused.quantizer(True, 0, torch.int8)[1] == "compiled"
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 11, 96) * 3
    layer = DynamicQuantLinear(linear, 8, 8, int8_matmul=True, kernel="onednn")
    with torch.no_grad():
        compiled = layer(x)
        monkeypatch.setenv("QBENCH_INT8_FUSION", "eager")
        assert torch.equal(layer(x), compiled)


def test_a_reference_loop_kernel_is_dropped_not_timed(monkeypatch):
    """An exact kernel whose one 64-row probe call is over the limit gets no time and is never chosen."""
    monkeypatch.setattr(int8_gemm, "PROBE_LIMIT_S", -1.0)
    assert int8_gemm._time("fp32-exact", [(64, 16)], 128, 1) == float("inf")
    monkeypatch.setattr(int8_gemm, "PROBE_LIMIT_S", 60.0)
    assert int8_gemm._time("fp32-exact", [(64, 16)], 128, 1) < 60.0


@pytest.mark.parametrize("kernel", ["amx", "vnni"])
def test_native_epilogue_gives_the_separate_rescale_bit_for_bit(kernel):
    """qbench's own kernels' epilogue ((float(acc) s_w) s_x + b, rounded after each operation)
    equals torch._int_mm's product times s_w followed by the layer's rescale, bit for bit:
    row counts, reductions and output widths that are no multiple of the blocks (32 or 4 rows,
    64 or 4 bytes, 32 or 64 channels), codes at +-127 (and -128, VNNI's u8 + 128 edge), with and
    without bias, a NaN row scale, and one scale per call (which the layer rescales in a second
    pass)."""
    if not available(kernel):
        pytest.skip(f"no {kernel} kernel here")
    g = torch.Generator().manual_seed(3)
    for rows, n_in, n_out in ((2048, 576, 192), (37, 1600, 48), (5, 70, 17), (1, 8, 1), (64, 128, 33), (7, 5, 70)):
        w = torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8)
        w[0] = 127
        codes = torch.randint(-127, 128, (rows, n_in), generator=g, dtype=torch.int8)
        codes[0] = 127
        codes[-1] = -128
        w_scale = torch.rand(n_out, generator=g) * 0.01 + 1e-3
        x_scale, bias = torch.rand(rows, 1, generator=g), torch.randn(n_out, generator=g)
        x_scale[-1] = float("nan")
        native, reference = Int8Gemm(kernel, w, w_scale), Int8Gemm("onednn", w, w_scale)
        assert torch.equal(native(codes), reference(codes))  # the GEMM times s_w, as the kernels give it
        for b in (bias, None):
            for fused in (False, True):
                want = reference.linear(codes, x_scale, b, native=False)
                got = native.linear(codes, x_scale, b, native=fused)
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        per_call = torch.tensor(0.37)
        assert torch.equal(native.linear(codes, per_call, bias), reference.linear(codes, per_call, bias))


def test_a_cpu_without_the_instructions_leaves_the_native_kernels_out(monkeypatch):
    """No AMX or VNNI flags: the kernels say why and are not candidates; nothing is built."""
    from qbench.quant import int8_linear, int8_native

    monkeypatch.setattr(int8_linear, "_state", {})
    monkeypatch.setattr(int8_native, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(int8_native, "build", lambda *a: pytest.fail("built on a CPU without the instructions"))
    assert int8_linear.library("amx") == (None, "no AMX-INT8 on this CPU")
    assert int8_linear.library("vnni") == (None, "no AVX-512 VNNI on this CPU")
    assert not available("amx") and not available("vnni")
    with pytest.raises(RuntimeError, match="not available here: no AMX-INT8"):
        Int8Gemm("amx", torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))
