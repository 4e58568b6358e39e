"""Per-token int8 quantization of a float32 matrix with one read of each row: a small C
kernel (AVX-512 intrinsics) built at first use by the machine's C compiler, the same one
torch.compile's inductor needs, cached per source, flags and compiler, and called through
ctypes (which releases the GIL).

Why not torch.compile (qbench.quant.int8_fused): inductor's code for the same operations
walks all rows twice, once for the row maxima and once for the codes, so at SmolLM2's
shapes (2,048 x 576 floats, 4.7 MB, past the L2 cache) the input is read twice from
memory, and it stores int8 through a partial-vector path: measured 0.64-0.94 ms a call at
1 thread where one read of the input takes 0.2 ms (bench/perf_quant.py; Intel Xeon, AMX).
This kernel keeps each row in L1 between its maximum and its codes.  No library offers the
operation (torch's quantized_decomposed per-token ops are Python decompositions; torchao's
int8 dynamic path measured slower than qbench's whole linear, results/PERF_QUANT.md).

Exactness: the codes and scales of qbench.quant.int8_fused.quantize_rows in the same float32
arithmetic: max |x| over the row (a NaN makes the row's scale NaN), max(amax, 1e-8f) / 127
rounded once, round(x / scale) half to even, + zero point.  The quotient is x * fl(1/scale),
within 2.3e-5 of the correctly rounded x / scale for |x / scale| <= 127.5; every lane whose
product lies within 2^-14 of a rounding tie (about 2 in 10,000) is divided exactly, so both
round to the same integer.  No clamp to +-127 is needed (|x| <= amax).  Compiled without
fast-math and without FMA contraction.  Before first use it is checked bit for bit against
the eager passes (int8_fused's adversarial rows) and dropped if it differs; CPUs without
AVX-512 (F, BW, VL, DQ) and machines without a compiler keep the compiled or eager passes.
Rows are split over torch's own OpenMP threads (the library binds to the libgomp torch has
loaded) when there are enough of them.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

# x / s as every C kernel of qbench's that quantizes computes it (this one's rows, the attention
# kernel's rows and channels): one C piece, put before each source that uses it
QUOTIENT_C = r"""
#include <stdint.h>
#include <math.h>
#include <immintrin.h>

/* |fl(x * r) - fl(x / s)| <= 1.5 * 2^-23 * |x / s| <= 2.3e-5 for |x / s| <= 127.5, with
   r = fl(1 / s).  Where fl(x * r) lies farther than 2^-14 from every k + 0.5, both round to
   the same integer; lanes nearer than that (about 2 in 10,000) are divided exactly. */
#define FAR_FROM_HALF (0.5f - 6.103515625e-05f)

/* the quotient that round(v / s) needs: v * r, divided exactly in the lanes near a tie or not
   finite (VREDUCEPS gives q - round(q) in one instruction); the lanes where v is NaN are added
   to *nan_lanes */
static inline __m512 qbench_quotient(__m512 v, __m512 r, __m512 s, __mmask16 *nan_lanes) {
    __m512 q = _mm512_mul_ps(v, r);
    const __m512 off = _mm512_abs_ps(_mm512_reduce_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __mmask16 exact = _mm512_cmp_ps_mask(off, _mm512_set1_ps(FAR_FROM_HALF), _CMP_NLE_UQ);
    if (exact) {
        q = _mm512_mask_div_ps(q, exact, v, s);
        *nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    return q;
}
"""

SOURCE = QUOTIENT_C + r"""
#include <omp.h>

static inline __m512 row_abs_max(const float *row, int64_t full, __mmask16 tail) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(row + c)));
    if (tail) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, row + full)));
    return m;
}

/* Rows first..last-1.  Each row's codes are computed from L1 while the next row's maximum is
   read from memory in the same loop (the two overlap: the first is arithmetic, the second
   loads).  No clamp to +-127 is needed: |x| <= amax, so |x / s| <= 127 (1 + 2^-24) < 127.5.
   A NaN in a row is found in the codes loop (its lane is never far from a half); the maximum
   of the other lanes then does not matter: the row's scale is NaN, as eager's amax makes it. */
static void quantize_range(const float *x, int64_t ld, int64_t first, int64_t last, int64_t cols, uint8_t *codes,
                           float *scales, int zero_point, int is_unsigned) {
    const __m512i zp = _mm512_set1_epi32(zero_point);
    const int64_t full = cols - cols % 16;
    const __mmask16 tail = (__mmask16)((1u << (cols % 16)) - 1u);
    if (first >= last) return;
    __m512 m = row_abs_max(x + first * ld, full, tail);
    for (int64_t r = first; r < last; ++r) {
        const float *row = x + r * ld;
        const float *next = r + 1 < last ? row + ld : row;  /* the last row re-reads itself (in L1) */
        uint8_t *out = codes + r * cols;
        float amax = _mm512_reduce_max_ps(m);
        float s = (amax < 1e-8f ? 1e-8f : amax) / 127.0f;  /* clamp_min */
        const __m512 sv = _mm512_set1_ps(s), rv = _mm512_set1_ps(1.0f / s);
        __m512 m_next = _mm512_setzero_ps();
        __mmask16 nan = 0;  /* lanes past the row load 0, never NaN */
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 k = c < full ? (__mmask16)0xFFFF : tail;
            m_next = _mm512_max_ps(m_next, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, next + c)));
            const __m512 q = qbench_quotient(_mm512_maskz_loadu_ps(k, row + c), rv, sv, &nan);
            __m512i i = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m128i b;
            if (is_unsigned) b = _mm512_cvtusepi32_epi8(_mm512_add_epi32(i, zp));
            else b = _mm512_cvtsepi32_epi8(i);
            _mm_mask_storeu_epi8(out + c, k, b);
        }
        scales[r] = nan ? NAN : s;
        m = m_next;
    }
}

/* y (rows, cols) = y * s[row] (+ b[col]): the rescale after the GEMM, in place, one pass:
   the same two roundings as y.mul_(s).add_(b). */
int qbench_rescale_rows(float *y, int64_t rows, int64_t cols, const float *s, const float *b, int threads) {
    const int64_t full = cols - cols % 16;
    const __mmask16 tail = (__mmask16)((1u << (cols % 16)) - 1u);
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        float *row = y + r * cols;
        const __m512 sv = _mm512_set1_ps(s[r]);
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 k = c < full ? (__mmask16)0xFFFF : tail;
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + c), sv);
            if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, b + c));
            _mm512_mask_storeu_ps(row + c, k, v);
        }
    }
    return 0;
}

int qbench_quantize_rows(const float *x, int64_t rows, int64_t cols, int64_t ld, uint8_t *codes, float *scale,
                         int zero_point, int is_unsigned, int threads) {
    /* torch's own OpenMP runtime (the process has libgomp.so.1 loaded already): its threads,
       each one contiguous block of rows */
    if (threads <= 1) { quantize_range(x, ld, 0, rows, cols, codes, scale, zero_point, is_unsigned); return 0; }
    #pragma omp parallel num_threads(threads)
    {
        const int64_t n = omp_get_num_threads(), t = omp_get_thread_num(), step = (rows + n - 1) / n;
        const int64_t first = t * step, last = first + step < rows ? first + step : rows;
        quantize_range(x, ld, first, last, cols, codes, scale, zero_point, is_unsigned);
    }
    return 0;
}
"""

FLAGS = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fPIC", "-shared", "-fopenmp",
         "-ffp-contract=off", "-fno-fast-math", "-fno-finite-math-only"]
# below this many elements a call stays on one thread
THREAD_MIN_ELEMENTS = 1 << 16
_state: dict = {}


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo; empty elsewhere)."""
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_has_avx512() -> bool:
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(name: str, source: str, flags: list[str]) -> ctypes.CDLL:
    """A C source's shared library: built once per source, flags and compiler into the cache
    folder (atomic rename under a lock), then loaded."""
    from qbench.atomic import FileLock
    from qbench.paths import cache_dir

    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError) as err:
        raise OSError(f"the C compiler does not run: {err}") from None
    key = hashlib.sha256("\0".join([source, *flags, version]).encode()).hexdigest()[:16]
    folder = cache_dir() / "native"
    folder.mkdir(parents=True, exist_ok=True)
    library_path = folder / f"{name}-{key}.so"
    with FileLock(folder / "build.lock"):
        if not library_path.exists():
            with tempfile.TemporaryDirectory(dir=folder) as work:
                source_path = Path(work) / f"{name}.c"
                source_path.write_text(source)
                built = Path(work) / f"{name}.so"
                try:
                    done = subprocess.run([compiler, *flags, str(source_path), "-o", str(built)], capture_output=True,
                                          text=True, timeout=120)
                except subprocess.SubprocessError as err:
                    raise OSError(f"the C compiler did not finish: {err}") from None
                if done.returncode != 0:
                    raise OSError(f"the C compiler failed: {(done.stderr.strip().splitlines() or [''])[-1][:200]}")
                os.replace(built, library_path)
    return ctypes.CDLL(str(library_path))


def _build() -> ctypes.CDLL:
    lib = build("quantize_rows", SOURCE, FLAGS)
    lib.qbench_quantize_rows.restype = lib.qbench_rescale_rows.restype = ctypes.c_int
    lib.qbench_quantize_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.qbench_rescale_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int]
    return lib


def library():
    """(the loaded library, None) once built, or (None, why not) on this machine."""
    if "lib" not in _state:
        if not cpu_has_avx512():
            _state["lib"], _state["why"] = None, "no AVX-512 (F, BW, VL, DQ) on this CPU"
        else:
            try:
                _state["lib"], _state["why"] = _build(), None
            except (OSError, subprocess.SubprocessError, AttributeError) as err:
                _state["lib"], _state["why"] = None, f"{type(err).__name__}: {str(err)[:200]}"
    return _state["lib"], _state["why"]


def threads_for(work: int, per_thread: int = THREAD_MIN_ELEMENTS) -> int:
    """torch's thread count for a call, fewer when the work gives each less than `per_thread`."""
    return max(1, min(torch.get_num_threads(), work // per_thread))


def _require():
    lib, why = library()
    if lib is None:
        raise RuntimeError(f"the native kernels are not available here: {why}")
    return lib


def quantize_rows(x: torch.Tensor, zero_point: int, dtype: torch.dtype):
    """x (N, K) float32 on the CPU -> (codes (N, K) `dtype`, scale (N, 1) float32): what
    int8_fused.quantize_rows(x, per_token=True, ...) gives, in one pass per row."""
    lib = _require()
    if dtype not in (torch.int8, torch.uint8) or x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError("the native quantizer takes a 2-D float32 CPU tensor and gives int8 or uint8 codes")
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=dtype)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    if rows and cols:
        lib.qbench_quantize_rows(x.data_ptr(), rows, cols, x.stride(0), codes.data_ptr(), scale.data_ptr(),
                                 zero_point, int(dtype == torch.uint8), threads_for(rows * cols))
    return codes, scale


def rescale_rows_(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (N, M) float32 contiguous, in place: y * scale (N, 1) (+ bias (M,)), one pass; the
    same two roundings as y.mul_(scale).add_(bias)."""
    lib = _require()
    rows, cols = y.shape
    if not (y.is_contiguous() and y.dtype == scale.dtype == torch.float32 and scale.numel() == rows
            and scale.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.numel() == cols
                                                            and bias.is_contiguous()))):
        raise ValueError("rescale_rows_ takes float32 contiguous y (N, M), scale (N, 1), bias (M,)")
    if rows and cols:
        lib.qbench_rescale_rows(y.data_ptr(), rows, cols, scale.data_ptr(),
                                None if bias is None else bias.data_ptr(), threads_for(rows * cols))
    return y
