"""Real int8 GEMMs for W8A8 with per-token activation scales, picked per machine.

y = s_x (X_q W_q^T) s_w + b, with X_q the per-token int8 codes and W_q the per-channel
int8 weight codes.  Candidates compute the int32 product X_q W_q^T:

  fbgemm, x86   torch's quantized engines: `quantized::linear_dynamic` on the float codes
                plus one extra row holding -128 and 127, so the engine's own per-tensor
                quantization of the input picks scale 1 and zero point 128 and represents
                every code exactly; per-channel int8 weights are prepacked once.  The
                engine multiplies by s_w; qbench multiplies the rows by s_x and adds b.
  onednn        torch._int_mm (oneDNN): int8 x int8 -> int32; fast where the CPU has int8
                dot-product units (AVX-512 VNNI / AMX), a slow reference path elsewhere.
  fp32-exact    the same integers through the fp32 GEMM, exact while the reduction length
                is <= 1024 (every partial sum below 2^24), in chunks of 1024 beyond.
  amx, vnni     qbench's own int8 linear (qbench.quant.int8_linear) on AMX-INT8 tiles or
                AVX-512 VNNI, weights packed once, the layer's per-token rescale and bias in
                its epilogue (one pass, no second read of the output).
  onednn-qlinear, onednn-qlinear-u8
                oneDNN's prepacked int8 linear (s8 codes, or u8 codes + 128), the weight
                scales in its epilogue, the per-token rescale a second pass.

At first use every available candidate is checked against the exact integer product on
adversarial inputs (codes at +-127, the case where AVX2's pairwise int16 multiply-add can
saturate), and the exact ones are timed at SmolLM2's shapes as the layer runs them (GEMM,
per-token rescale and bias); the fastest is cached per CPU model and flags in
$QBENCH_CACHE/int8_gemm.json (QBENCH_INT8_GEMM=<name> forces one).
Cells record the kernel that ran (`quantization.int8_kernel`).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings

import torch

CANDIDATES = ("amx", "vnni", "onednn-qlinear", "onednn-qlinear-u8", "fbgemm", "x86", "onednn", "fp32-exact")
QLINEAR = ("onednn-qlinear", "onednn-qlinear-u8")
NATIVE = ("amx", "vnni")  # qbench.quant.int8_linear
EXACT_FP32_K = 1024
_choice: str | None = None


def cpu_signature() -> dict:
    """CPU model, instruction-set flags that matter for int8, torch version."""
    from qbench.quant.int8_native import cpu_flags
    from qbench.record import machine

    model = machine()["cpu"] or "unknown"
    flags = cpu_flags()
    relevant = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni", "fma"))
    # the candidate list is part of the key: a cache written before a kernel existed is not reused
    return {"cpu": model, "flags": relevant, "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "candidates": list(CANDIDATES)}


def _signature_key(signature: dict) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


class Int8Gemm:
    """One layer's int8 weights prepared (packed once) for one kernel; `__call__(x_codes) ->
    acc * s_w` as float32 (N, out).  x_codes (N, in) are the int8 codes, best given already
    in `input_dtype` with `zero_point` added (what the kernel reads: int8, uint8 + 128, or
    float codes); codes of another dtype are converted first (one more pass)."""

    def __init__(self, kernel: str, weight_codes: torch.Tensor, weight_scale: torch.Tensor):
        self.kernel = kernel
        self.weight_scale = weight_scale.float().contiguous()
        self.out_features, self.in_features = weight_codes.shape
        self.input_dtype, self.zero_point = torch.int8, 0
        if kernel in NATIVE:
            from qbench.quant.int8_linear import NativeLinear

            self.native = NativeLinear(kernel, weight_codes, self.weight_scale)
        elif kernel in QLINEAR:
            if kernel == "onednn-qlinear-u8":
                self.input_dtype, self.zero_point = torch.uint8, 128
            self.packed = torch.ops.onednn.qlinear_prepack(weight_codes.to(torch.int8).contiguous(), None)
            self.weight_zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        elif kernel in ("fbgemm", "x86"):
            self.input_dtype = torch.float32
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch deprecates quantized tensor creation, not the kernels
                with _engine(kernel):
                    qweight = torch._make_per_channel_quantized_tensor(
                        weight_codes.to(torch.int8), weight_scale.double(),
                        torch.zeros(self.out_features, dtype=torch.int64), 0)
                    self.packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.pad = torch.zeros(1, self.in_features)
            self.pad[0, 0], self.pad[0, min(1, self.in_features - 1)] = -128.0, 127.0
            if self.in_features == 1:
                raise ValueError("the quantized-engine path needs at least 2 input features")
        elif kernel == "onednn":
            self.weight_t = weight_codes.to(torch.int8).t()  # column-major right operand: oneDNN's fast layout
        elif kernel == "fp32-exact":
            self.input_dtype = torch.float32
            self.weight_t = weight_codes.float().t().contiguous()
        else:
            raise ValueError(f"unknown int8 kernel {kernel!r}; choose one of {CANDIDATES}")

    def __call__(self, x_codes: torch.Tensor) -> torch.Tensor:
        if x_codes.dtype != self.input_dtype:
            x_codes = (x_codes.to(torch.int16) + self.zero_point if self.zero_point else x_codes).to(self.input_dtype)
        if self.kernel in NATIVE:
            return self.native(x_codes)
        if self.kernel in QLINEAR:
            return torch.ops.onednn.qlinear_pointwise(
                x_codes.contiguous(), 1.0, self.zero_point, self.packed, self.weight_scale, self.weight_zero_points,
                None, 1.0, 0, torch.float32, "none", [], "")
        if self.kernel in ("fbgemm", "x86"):
            with _engine(self.kernel):
                return torch.ops.quantized.linear_dynamic(torch.cat([x_codes, self.pad]), self.packed, False)[:-1]
        if self.kernel == "onednn":
            return torch._int_mm(x_codes, self.weight_t).float() * self.weight_scale
        acc = None
        for start in range(0, self.in_features, EXACT_FP32_K):
            part = x_codes[:, start:start + EXACT_FP32_K] @ self.weight_t[start:start + EXACT_FP32_K]
            acc = part if acc is None else acc + part
        return acc * self.weight_scale

    def linear(self, x_codes: torch.Tensor, x_scale: torch.Tensor, bias: torch.Tensor | None = None,
               native: bool = False) -> torch.Tensor:
        """The layer's output ((X_q W_q^T) s_w) s_x + b, float32 (N, out): x_scale (N, 1) per
        token or () per call.  qbench's own kernels apply s_x and b in their epilogue; the others
        return (X_q W_q^T) s_w and the rescale is a second pass (`native`: qbench's one-pass C
        rescale, qbench.quant.int8_native; else torch's mul_ and add_).  The same roundings,
        in the same order, either way."""
        per_row = (x_scale.dtype == torch.float32 and x_scale.numel() == x_codes.shape[0] and x_scale.is_contiguous()
                   and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))
        if self.kernel in NATIVE and per_row:
            return self.native(x_codes, x_scale, bias)
        y = self(x_codes)  # (N, out): X_q W_q^T s_w
        if native and per_row and y.is_contiguous() and y.dtype == torch.float32:
            from qbench.quant.int8_native import rescale_rows_

            return rescale_rows_(y, x_scale, bias)  # the same two roundings, one pass
        y = y.mul_(x_scale)  # (X_q W_q^T s_w) s_x, in place on the GEMM's output
        return y if bias is None else y.add_(bias)


class _engine:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.previous = torch.backends.quantized.engine
        if self.previous != self.name:
            torch.backends.quantized.engine = self.name

    def __exit__(self, *exc):
        if torch.backends.quantized.engine != self.previous:
            torch.backends.quantized.engine = self.previous


def available(kernel: str) -> bool:
    if kernel in NATIVE:
        from qbench.quant.int8_linear import library

        return library(kernel)[0] is not None
    if kernel in ("fbgemm", "x86"):
        return kernel in torch.backends.quantized.supported_engines
    if kernel in QLINEAR:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    return True


def exactness_error(kernel: str, n_in: int = 1600, n_out: int = 48, tokens: int = 37) -> float:
    """Max relative error of a kernel's (acc * s_w) against the exact integer product on
    adversarial codes: rows and columns of +-127 (pairwise int16 saturation on AVX2),
    random codes, and a reduction longer than 1024."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (tokens, n_in), generator=generator).float()
    w = torch.randint(-127, 128, (n_out, n_in), generator=generator)
    x[0], w[0] = 127.0, 127  # every product at the maximum: sums of adjacent pairs 2 * 255 * 127 in u8 terms
    x[1], w[1] = -127.0, -127
    x[2, ::2], w[2, ::2] = 127.0, 127
    scale = torch.rand(n_out, generator=generator) * 0.01 + 1e-3
    exact = (x.double() @ w.double().t()) * scale.double()
    got = Int8Gemm(kernel, w.to(torch.int8), scale)(x).double()
    return float(((got - exact).abs() / exact.abs().clamp_min(1.0)).max())


# An exact int32 sum becomes float32 (one rounding, <= 2^-24 relative), fp32-exact adds its
# exact 1024-long chunks (one more), and the product with s_w rounds once more: <= 3 ulps;
# 4 * 2^-24 leaves one for the float64 reference.  A saturated or approximate kernel is off
# by whole units of the integer sum, orders of magnitude more.
EXACT_TOLERANCE = 4 * 2.0**-24


# A kernel that is exact but falls back to a reference loop (oneDNN's s8 x s8 qlinear
# without AMX took 6.2 s for 256 rows) is not timed at full size: one 64-row call of each
# shape first, and a kernel slower than this per call is dropped from the choice.
PROBE_ROWS, PROBE_LIMIT_S = 64, 0.25


def _time(kernel: str, shapes, tokens: int, repeats: int) -> float:
    total = 0.0
    native = _native_rescale()
    for n_in, n_out in shapes:
        generator = torch.Generator().manual_seed(1)
        w = torch.randint(-127, 128, (n_out, n_in), generator=generator).to(torch.int8)
        gemm = Int8Gemm(kernel, w, torch.full((n_out,), 0.01))
        x = torch.randint(-127, 128, (tokens, n_in), generator=generator).to(torch.int16)
        x = (x + gemm.zero_point).to(gemm.input_dtype)  # the codes as the kernel reads them
        x_scale, bias = torch.rand(tokens, 1, generator=generator), torch.randn(n_out, generator=generator)

        def layer(rows):  # what the layer runs after its quantizer: GEMM, rescale, bias
            return gemm.linear(x[:rows], x_scale[:rows], bias, native)
        start = time.perf_counter()
        layer(PROBE_ROWS)
        if time.perf_counter() - start > PROBE_LIMIT_S:
            return float("inf")
        layer(tokens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(tokens)
            times.append(time.perf_counter() - start)
        total += statistics.median(times)
    return total


def _native_rescale() -> bool:
    """Whether the layer's rescale runs as qbench's C pass here (as the layer decides it)."""
    from qbench.quant.int8_fused import quantizer

    return quantizer(True, 0, torch.int8)[1] == "native"


SMOLLM2_SHAPES = [(576, 576), (576, 1536), (1536, 576)]


def measure(tokens: int = 512, repeats: int = 5, shapes=None) -> dict:
    """Check and time every candidate here; returns {kernel: {"exact", "error", "seconds"}}."""
    shapes = shapes or SMOLLM2_SHAPES
    out = {}
    for kernel in CANDIDATES:
        if not available(kernel):
            out[kernel] = {"available": False}
            continue
        try:
            error = exactness_error(kernel)
        except (RuntimeError, ValueError) as err:
            out[kernel] = {"available": False, "error_message": f"{type(err).__name__}: {str(err)[:200]}"}
            continue
        exact = error <= EXACT_TOLERANCE
        seconds = _time(kernel, shapes, tokens, repeats) if exact else None
        out[kernel] = {"available": True, "exact": exact, "max_rel_error": error,
                       "seconds": seconds if seconds != float("inf") else None}
        if seconds == float("inf"):
            out[kernel]["too_slow"] = f"one {PROBE_ROWS}-row call took over {PROBE_LIMIT_S} s (a reference loop)"
    return out


def choose(refresh: bool = False, shape: tuple[int, int] | None = None) -> str:
    """The int8 kernel for this machine (and, given `shape` = (in, out), for that layer
    shape: the fastest kernel differs between shapes): QBENCH_INT8_GEMM if set, else the
    cached choice for this CPU and shape (measured now if there is none)."""
    global _choice
    forced = os.environ.get("QBENCH_INT8_GEMM")
    if forced:
        if forced not in CANDIDATES:
            raise ValueError(f"QBENCH_INT8_GEMM={forced!r}: choose one of {CANDIDATES}")
        return forced
    if shape is not None:
        return _choose_for_shape(tuple(shape), refresh)
    if _choice is not None and not refresh:
        return _choice
    from qbench.atomic import FileLock, atomic_write_text
    from qbench.paths import cache_dir

    signature = cpu_signature()
    key = _signature_key(signature)
    path = cache_dir() / "int8_gemm.json"
    with FileLock(cache_dir() / "int8_gemm.lock"):  # one process measures, the others read
        cached = {}
        if path.exists():
            try:
                cached = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                cached = {}
        entry = cached.get(key)
        if entry is None or refresh:
            measured = measure()
            timed = {k: v["seconds"] for k, v in measured.items() if v.get("exact") and v.get("seconds")}
            entry = {"signature": signature, "kernel": min(timed, key=timed.get), "candidates": measured,
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            cached[key] = entry
            atomic_write_text(path, json.dumps(cached, indent=1))
    _choice = entry["kernel"]
    return _choice


_by_shape: dict[tuple[int, int], str] = {}


def _choose_for_shape(shape: tuple[int, int], refresh: bool) -> str:
    if shape in _by_shape and not refresh:
        return _by_shape[shape]
    from qbench.atomic import FileLock, atomic_write_text
    from qbench.paths import cache_dir

    choose()  # the machine-level entry (validates every candidate once)
    signature = cpu_signature()
    key = _signature_key(signature)
    path = cache_dir() / "int8_gemm.json"
    with FileLock(cache_dir() / "int8_gemm.lock"):
        cached = json.loads(path.read_text()) if path.exists() else {}
        entry = cached.setdefault(key, {"signature": signature})
        shapes = entry.setdefault("by_shape", {})
        label = f"{shape[0]}x{shape[1]}"
        if label not in shapes or refresh:
            exact = [k for k, v in entry.get("candidates", {}).items()
                     if v.get("exact") and v.get("seconds")] or ["fp32-exact"]
            timed = {k: _time(k, [shape], 512, 5) for k in exact}
            shapes[label] = {"kernel": min(timed, key=timed.get),
                             "seconds": {k: (v if v != float("inf") else None) for k, v in timed.items()}}
            atomic_write_text(path, json.dumps(cached, indent=1))
    _by_shape[shape] = shapes[label]["kernel"]
    return _by_shape[shape]
