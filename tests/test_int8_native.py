"""The native per-token quantizer and rescale (qbench.quant.int8_native): the same numbers
as the eager passes, bit for bit, where the CPU has AVX-512; elsewhere (or without a
compiler) the layer falls back to the compiled or eager passes and says so."""
import functools

import pytest
import torch

from qbench.quant import int8_fused, int8_native
from qbench.quant.int8_fused import quantize_mismatch, quantize_rows
from qbench.quant.simulated import DynamicQuantLinear

LIB, WHY = int8_native.library()
needs_native = pytest.mark.skipif(LIB is None, reason=f"no native kernel here: {WHY}")
SPECS = [(0, torch.int8), (128, torch.uint8)]


def near_ties(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows whose x / scale lie on k + 0.5 or 1-4 ulps from it, with scales over many
    binades: where the kernel's x * (1 / s) and the exact x / s could round apart."""
    g = torch.Generator().manual_seed(seed)
    amax = torch.exp(torch.randn(rows, 1, generator=g) * 6)
    k = torch.randint(-127, 127, (rows, cols), generator=g).float()
    x = (k + 0.5) * (amax / 127)
    steps = torch.randint(-4, 5, (rows, cols), generator=g)
    for _ in range(4):
        x = torch.where(steps > 0, torch.nextafter(x, torch.full_like(x, float("inf"))), x)
        x = torch.where(steps < 0, torch.nextafter(x, torch.full_like(x, float("-inf"))), x)
        steps = steps - steps.sign()
    x[:, 0] = amax[:, 0]  # the row maximum fixes the scale
    return x


@needs_native
@pytest.mark.parametrize("zero_point,dtype", SPECS)
def test_native_codes_and_scales_equal_eager_bit_for_bit(zero_point, dtype):
    native = functools.partial(int8_native.quantize_rows, zero_point=zero_point, dtype=dtype)
    assert quantize_mismatch(native, True, zero_point, dtype) is None  # the check the layer runs
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(40, 1600, generator=g) * 7
    cases = [near_ties(256, 577, 0), near_ties(64, 16, 1), torch.zeros(3, 33), wide[:, :1537],  # a row stride > width
             torch.randn(5, 1, generator=g), torch.randn(2048, 64, generator=g) * 1e-9]
    previous = torch.get_num_threads()
    for x in cases:
        want = quantize_rows(x, True, zero_point, dtype)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                got = native(x)
            finally:
                torch.set_num_threads(previous)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (tuple(x.shape), threads)


@needs_native
def test_a_nan_in_a_row_makes_its_scale_nan_as_eager():
    x = torch.randn(4, 40)
    x[2, 17] = float("nan")
    scale = int8_native.quantize_rows(x, 0, torch.int8)[1]
    assert torch.isnan(scale[2]).all() and not torch.isnan(scale[[0, 1, 3]]).any()
    assert torch.isnan(quantize_rows(x, True, 0, torch.int8)[1][2]).all()


@needs_native
def test_native_rescale_equals_mul_then_add():
    g = torch.Generator().manual_seed(2)
    for cols in (1, 15, 16, 192, 577):
        y, s, b = torch.randn(33, cols, generator=g), torch.rand(33, 1, generator=g), torch.randn(cols, generator=g)
        assert torch.equal(int8_native.rescale_rows_(y.clone(), s, b), y.clone().mul_(s).add_(b))
        assert torch.equal(int8_native.rescale_rows_(y.clone(), s, None), y.clone().mul_(s))
    with pytest.raises(ValueError):
        int8_native.rescale_rows_(torch.randn(4, 6).t(), torch.rand(6, 1), None)


@needs_native
@pytest.mark.parametrize("kernel", ["onednn", "onednn-qlinear-u8"])
def test_layer_with_native_passes_equals_eager(monkeypatch, kernel):
    """QBENCH_INT8_FUSION=native (the default outside tests): the layer's output equals the
    eager passes' exactly, int8 and uint8 (+128) codes alike."""
    from qbench.quant.int8_gemm import available

    if not available(kernel):
        pytest.skip(f"{kernel} is not available here")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 11, 96) * 3
    layer = DynamicQuantLinear(linear, 8, 8, int8_matmul=True, kernel=kernel)
    monkeypatch.setenv("QBENCH_INT8_FUSION", "native")
    int8_fused.shared_codes.clear()
    spec = (True, layer.gemm.zero_point, layer.gemm.input_dtype)
    assert int8_fused.quantizer(*spec)[1] == "native"
    with torch.no_grad():
        native = layer(x)
        int8_fused.shared_codes.clear()
        monkeypatch.setenv("QBENCH_INT8_FUSION", "eager")
        assert torch.equal(layer(x), native)


def test_without_the_native_kernel_the_layer_says_why_and_uses_the_compiled_passes(monkeypatch):
    monkeypatch.setattr(int8_native, "_state", {"lib": None, "why": "no AVX-512 (test)"})
    monkeypatch.setattr(int8_fused, "_cache", {})
    monkeypatch.setattr(int8_fused, "_quantizer_compiled", lambda *args: (args[-1], "compiled"))
    monkeypatch.setenv("QBENCH_INT8_FUSION", "native")
    fn, mode = int8_fused.quantizer(True, 0, torch.int8)
    assert mode == "compiled (native kernel not used: no AVX-512 (test))"
    x = torch.randn(4, 9)
    assert all(torch.equal(a, b) for a, b in zip(fn(x), quantize_rows(x, True, 0, torch.int8)))
    with pytest.raises(RuntimeError, match="no AVX-512"):
        int8_native.quantize_rows(x, 0, torch.int8)
