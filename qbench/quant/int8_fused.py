"""The passes around the real int8 GEMMs (and the low-bit attention kernel's blocks), fused
by torch.compile where that reproduces the eager arithmetic bit for bit.

Per-token activation quantization is four passes eager (abs, amax, divide-round-clamp,
cast) with fresh buffers; at SmolLM2's shapes that costs as much as the int8 GEMM itself,
and inductor's C++ code does it in one vectorised pass over the rows.  The compiled
functions are the same float operations (IEEE division, round-half-even, no contraction
into FMAs), so the codes and scales are identical to the eager ones: checked once per
process on adversarial rows (ties at .5, zero rows, +-max); any mismatch or compile failure
falls back to eager.  The rescale after the GEMM is not compiled (a compiled pass writes a
fresh buffer and measured slower): in place on the GEMM's output (eager, or qbench's one-pass
C rescale at the native level), or in the epilogue of qbench's own GEMM kernels
(qbench.quant.int8_linear).

Per-token int8 codes, the real int8 linears' case, go one step further where the CPU has
AVX-512: qbench.quant.int8_native's C kernel reads each row once (inductor's code reads the
input twice: its pass took 0.55-0.9 ms against the kernel's 0.29 ms at 2,048 x 576, 1 thread)
and rescales in one pass; it is
checked against the eager passes the same way, and the compiled passes serve where it is
unavailable or differs.  QBENCH_INT8_FUSION=native (default) | compiled | eager forces a
level; cells record which ran (`int8_fusion`).
"""
from __future__ import annotations

import functools
import os
import types

import torch

QMAX = 127
MODES = ("native", "compiled", "eager")


def quantize_rows(x: torch.Tensor, per_token: bool, zero_point: int, dtype: torch.dtype):
    """x (N, K) float32 -> codes (N, K) in `dtype` (+ zero_point), scale (N, 1) or ():
    the same operations as qbench.quant.simulated.symmetric_scale / quantize_symmetric."""
    amax = x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax()
    scale = amax.clamp_min(1e-8) / QMAX
    codes = torch.clamp(torch.round(x / scale), -QMAX, QMAX)
    if zero_point:
        codes = codes + zero_point
    return codes.to(dtype), scale


def _adversarial_rows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 200, generator=generator) * 3
    x[0] = 0.0  # a zero row: the clamp_min floor
    x[1, :] = torch.arange(200) * 0.5 - 50  # exact halves after scaling: ties round to even
    x[1, 0] = 127.0
    x[2] *= 1e6
    x[3, ::3] = -x[3].abs().max()
    return x


def quantize_mismatch(candidate, per_token: bool, zero_point: int, dtype: torch.dtype) -> str | None:
    """None when `candidate` gives quantize_rows' codes and scales bit for bit on adversarial
    rows of two shapes (the second exercises a compiled function's dynamic-shape code)."""
    x = _adversarial_rows()
    ties = (torch.arange(-254, 255) * 0.5).reshape(1, -1)  # max 127: scale exactly 1, every .5 a tie
    for rows in (x, x[:5, :64], ties):
        want, got = quantize_rows(rows, per_token, zero_point, dtype), candidate(rows)
        if not (torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])):
            return f"quantization differs from eager (per_token={per_token}, zero point {zero_point}, {dtype})"
    return None


def _mode() -> str:
    forced = os.environ.get("QBENCH_INT8_FUSION", "native")
    if forced not in MODES:
        raise ValueError(f"QBENCH_INT8_FUSION={forced!r}: choose one of {MODES}")
    return forced


def per_fusion_mode(build):
    """`build(*args)` made once per argument set and fusion mode (QBENCH_INT8_FUSION and the
    generation of the compiled cache): for callers that look their fused functions up on every
    call (the attention kernel's blocks; the lookup cost ~30 us a call)."""
    @functools.lru_cache(maxsize=32)
    def cached(mode, *args):
        return build(*args)

    @functools.wraps(build)
    def lookup(*args):
        return cached(f"{_mode()}:{id(_cache)}", *args)
    return lookup


_cache: dict = {}


def _own_code(fn, key):
    """A copy of `fn` (or of a partial's function) with a code object of its own: dynamo keeps
    compiled graphs and its recompile limit per code object, so every specialisation (and
    every thread count it meets) gets its own budget instead of sharing one."""
    inner = fn.func if isinstance(fn, functools.partial) else fn
    name = "_".join(str(part) for part in (inner.__name__, *key)).replace(".", "_").replace(" ", "_")
    code = inner.__code__.replace(co_name=name[:100])
    copy = types.FunctionType(code, inner.__globals__, name[:100], inner.__defaults__, inner.__closure__)
    copy.__kwdefaults__ = inner.__kwdefaults__
    return functools.partial(copy, *fn.args, **fn.keywords) if isinstance(fn, functools.partial) else copy


def _compiled(key, build, check) -> tuple:
    """(function, mode) for one specialisation: compiled and checked once per process.
    Not fullgraph: should dynamo ever give up on a frame (its recompile limit), that call
    runs the same operations eagerly instead of failing the cell."""
    if key not in _cache:
        try:
            # dynamic shapes: one graph serves every layer width and token count
            fn = torch.compile(_own_code(build(), key), dynamic=True)
            with torch.no_grad():
                reason = check(fn)
        except Exception as err:  # noqa: BLE001  no compiler, an inductor bug: the eager passes still work
            reason = f"torch.compile failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
        _cache[key] = (fn, "compiled") if reason is None else (None, f"eager ({reason})")
    return _cache[key]


def fused(name: str, eager, check, device: torch.device | str = "cpu") -> tuple:
    """(function, mode) for any elementwise block: `eager` compiled where `check(candidate)`
    (None = bit-equal to eager) holds here, else `eager` itself.  CPU only: the check runs
    on the CPU, and a GPU compiler's division need not be IEEE's."""
    if _mode() == "eager" or torch.device(device).type != "cpu":  # native: the compiled blocks
        return eager, "eager"
    fn, mode = _compiled((name,), lambda: eager, check)
    return (fn or eager), mode


def _native(zero_point: int, dtype: torch.dtype) -> tuple:
    """(the native per-token quantizer, None) when built and exact here, else (None, why)."""
    key = ("native", zero_point, dtype)
    if key not in _cache:
        from qbench.quant import int8_native

        lib, why = int8_native.library()
        fn = functools.partial(int8_native.quantize_rows, zero_point=zero_point, dtype=dtype)
        if lib is not None:
            why = quantize_mismatch(fn, True, zero_point, dtype)
        _cache[key] = (fn, None) if lib is not None and why is None else (None, why)
    return _cache[key]


def quantizer(per_token: bool, zero_point: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple:
    """(x -> (codes, scale), mode): the native kernel (per-token int8 codes) or the compiled
    passes when exact here, else the eager passes.  Looked up on every layer call: the
    answer is kept per fusion mode and arguments, for the compiled cache it was made with."""
    key = (_mode(), per_token, zero_point, dtype, torch.device(device).type)
    found = _quantizers.get(key)
    if found is None or found[0] is not _cache:  # a cleared cache (tests) answers afresh
        found = _quantizers[key] = (_cache, _quantizer(per_token, zero_point, dtype, key[-1]))
    return found[1]


_quantizers: dict = {}


def _quantizer(per_token: bool, zero_point: int, dtype: torch.dtype, device_type: str) -> tuple:
    eager = functools.partial(quantize_rows, per_token=per_token, zero_point=zero_point, dtype=dtype)
    if _mode() == "eager" or device_type != "cpu":
        return eager, "eager"
    if _mode() == "native" and per_token and dtype in (torch.int8, torch.uint8):
        fn, why = _native(zero_point, dtype)
        if fn is not None:
            return fn, "native"
        compiled, mode = _quantizer_compiled(per_token, zero_point, dtype, eager)
        return compiled, f"{mode} (native kernel not used: {why})"
    return _quantizer_compiled(per_token, zero_point, dtype, eager)


def _quantizer_compiled(per_token: bool, zero_point: int, dtype: torch.dtype, eager) -> tuple:
    """(the compiled quantizer, "compiled") when exact here, else (eager, "eager (why)")."""
    fn, mode = _compiled(("quantize", per_token, zero_point, dtype),
                         lambda: functools.partial(quantize_rows, per_token=per_token, zero_point=zero_point,
                                                   dtype=dtype),
                         lambda fn: quantize_mismatch(fn, per_token, zero_point, dtype))
    return (fn or eager), mode


class SharedCodes:
    """The last input's codes, reused when the next layer reads the very same tensor: q, k
    and v projections (and gate and up) quantize one input, which is done once.  A hit needs
    the same storage, shape, strides and version counter (no in-place change since) and the
    same quantizer; the entry holds its tensor, so its memory cannot be reused meanwhile."""

    def __init__(self):
        self.key, self.source, self.value = None, None, None

    def get(self, x: torch.Tensor, spec: tuple, quantize):
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.dtype, x.device, spec)
        if self.source is None or key != self.key:
            self.key, self.source, self.value = key, x, quantize(x)
        return self.value

    def clear(self) -> None:
        self.key, self.source, self.value = None, None, None


shared_codes = SharedCodes()
