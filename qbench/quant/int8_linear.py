"""The int8 W8A8 linear as one C call with the rescale in the GEMM's epilogue, on AMX tiles
(`amx`) or AVX-512 VNNI (`vnni`): built at first use like qbench.quant.int8_native's quantizer.

y[m, n] = ((float(sum_k X[m, k] W[n, k]) * s_w[n]) * s_x[m]) + b[n]: the integer product
exact in int32, then the same three float roundings, in the same order, as the other
kernels' `_int_mm(...).float() * s_w` followed by the layer's rescale (`y * s_x + b`).
Weights are packed once per layer; the codes are read as they are.

  amx   `tdpbssd` (signed x signed) on tiles: weights packed 16 output channels x 64
        reduction bytes per tile (zero padded to whole tiles), blocks of 32 rows x 32
        channels in four 16 x 16 int32 tiles, row and reduction tails through a zero-padded
        copy; each thread configures its tiles (Linux asks a process for AMX permission:
        arch_prctl, requested when the library loads).
  vnni  `vpdpbusd` (u8 x s8): the codes + 128 as u8 and 128 sum_k W[n, k] taken off, weights
        packed 16 channels x 4 reductions per 64 bytes; 4 rows x 64 channels (16 int32
        accumulators) per step.
Each thread takes whole blocks of 32 rows; a block's accumulators become float output in
registers or L1, so the GEMM's output is written once.

Why: oneDNN's prepacked qlinear (the kernel these replace where they measure faster) takes
one activation scale per call, so the per-token rescale is a second pass over the output,
and each call costs ~23 us of fixed primitive handling; at SmolLM2's narrow 576 -> 192
projection those were a third of the layer's time.  No library exposes an int8 GEMM with a
per-row scale in its epilogue on the CPU (torch._int_mm returns int32; torchao's and
optimum-quanto's int8 paths rescale in separate passes, results/PERF_QUANT.md).

int8_gemm checks each kernel's exactness and times it against the other candidates like any
kernel; a CPU without the instructions, a compiler without the flags, or a kernel refusing
AMX to the process leaves the kernel unavailable (`library(kind)` says why).
"""
from __future__ import annotations

import ctypes

import torch

from qbench.quant import int8_native

AMX_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>
#include <unistd.h>
#include <sys/syscall.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* 0 when this process may use the AMX tile data (Linux asks programs to request it) */
int qbench_amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* W (n, k) int8 row-major -> wp: per block of 16 output channels jb and chunk of 64 reductions c,
   one tile of 16 rows (4 reductions each) x 64 bytes (16 channels x 4): wp[((jb kc + c) 16 + r) 64 +
   4 col + i] = W[16 jb + col, 64 c + 4 r + i], zero outside W; blocks of channels up to a multiple of 32. */
void qbench_amx_pack(const int8_t *w, int64_t n, int64_t k, int8_t *wp, int32_t *wsum) {
    (void)wsum;
    const int64_t kc = (k + 63) / 64, nblocks = ((n + 31) / 32) * 2;
    memset(wp, 0, (size_t)(nblocks * kc * 1024));
    for (int64_t col = 0; col < n; ++col)
        for (int64_t kk = 0; kk < k; ++kk) {
            const int64_t jb = col / 16, c = kk / 64, r = (kk % 64) / 4, i = kk % 4;
            wp[((jb * kc + c) * 16 + r) * 64 + (col % 16) * 4 + i] = w[col * k + kk];
        }
}

/* y (m, n) float = ((float(X W^T) * sw[n]) * sx[m]) + bias[n]; sx NULL: no row scale (the
   GEMM alone times s_w, as the other kernels give it); bias NULL: none.  x (m, k) int8
   row-major. */
int qbench_amx_linear(const int8_t *x, int64_t m, int64_t k, const int8_t *wp, const int32_t *wsum, int64_t n,
                      const float *sw,
                      const float *sx, const float *bias, float *y, int threads) {
    const int64_t kc = (k + 63) / 64, ncb = (n + 31) / 32, mcb = (m + 31) / 32;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        _tile_loadconfig(&cfg);
        int8_t pad[32 * 64] __attribute__((aligned(64)));
        int32_t acc[32 * 32] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t mb = 0; mb < mcb; ++mb) {
            const int64_t m0 = mb * 32, rows = m - m0 < 32 ? m - m0 : 32;
            for (int64_t nb = 0; nb < ncb; ++nb) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t c = 0; c < kc; ++c) {
                    const int64_t cols = k - c * 64 < 64 ? k - c * 64 : 64;
                    const int8_t *a = x + m0 * k + c * 64;
                    int64_t lda = k;
                    if (rows < 32 || cols < 64) {  /* a tail: zero padded (zeros add nothing) */
                        memset(pad, 0, sizeof pad);
                        for (int64_t r = 0; r < rows; ++r) memcpy(pad + r * 64, a + r * k, (size_t)cols);
                        a = pad;
                        lda = 64;
                    }
                    _tile_loadd(4, a, lda);
                    _tile_loadd(5, a + 16 * lda, lda);
                    _tile_loadd(6, wp + ((2 * nb) * kc + c) * 1024, 64);
                    _tile_loadd(7, wp + ((2 * nb + 1) * kc + c) * 1024, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbssd(1, 4, 7);
                    _tile_dpbssd(2, 5, 6);
                    _tile_dpbssd(3, 5, 7);
                }
                _tile_stored(0, acc, 128);
                _tile_stored(1, acc + 16, 128);
                _tile_stored(2, acc + 16 * 32, 128);
                _tile_stored(3, acc + 16 * 32 + 16, 128);
                for (int64_t h = 0; h < 2; ++h) {
                    const int64_t n0 = nb * 32 + h * 16;
                    if (n0 >= n) break;
                    const __mmask16 mask = n - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - n0)) - 1u);
                    const __m512 s_w = _mm512_maskz_loadu_ps(mask, sw + n0);
                    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
                    for (int64_t r = 0; r < rows; ++r) {
                        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc + r * 32 + h * 16)), s_w);
                        if (sx) v = _mm512_mul_ps(v, _mm512_set1_ps(sx[m0 + r]));
                        if (bias) v = _mm512_add_ps(v, b);
                        _mm512_mask_storeu_ps(y + (m0 + r) * n + n0, mask, v);
                    }
                }
            }
        }
        _tile_release();
    }
    return 0;
}
"""

VNNI_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

int qbench_vnni_init(void) { return 0; }

/* W (n, k) int8 row-major -> wp: per block of 16 output channels jb and group of 4 reductions g,
   64 bytes wp[(jb kq + g) 64 + 4 col + i] = W[16 jb + col, 4 g + i], zero outside W, blocks up
   to a multiple of 4 (64 channels); and wsum[c] = sum_k W[c, k] (0 past n). */
void qbench_vnni_pack(const int8_t *w, int64_t n, int64_t k, int8_t *wp, int32_t *wsum) {
    const int64_t kq = (k + 3) / 4, nb = ((n + 63) / 64) * 4;
    memset(wp, 0, (size_t)(nb * kq * 64));
    for (int64_t c = 0; c < nb * 16; ++c) wsum[c] = 0;
    for (int64_t c = 0; c < n; ++c)
        for (int64_t kk = 0; kk < k; ++kk) {
            wp[((c / 16) * kq + kk / 4) * 64 + (c % 16) * 4 + kk % 4] = w[c * k + kk];
            wsum[c] += w[c * k + kk];
        }
}

/* 4 codes of a row from reduction 4 g on, + 128 as u8 (the top bit flipped); past k: code 0
   (+ 128, times a zero weight: nothing) */
static inline __m512i codes4(const int8_t *row, int64_t g, int64_t k) {
    int32_t v = 0;
    if (4 * g + 4 <= k) memcpy(&v, row + 4 * g, 4);
    else memcpy(&v, row + 4 * g, (size_t)(k - 4 * g));
    return _mm512_set1_epi32(v ^ (int32_t)0x80808080);
}

/* 4 rows x 64 channels (4 blocks of 16) over every reduction: 16 accumulators, named so that
   they stay in registers; acc[4 i + j] = sum (X_i + 128) W_j */
#define STEP(x, w0, w1, w2, w3, c0, c1, c2, c3) \
    c0 = _mm512_dpbusd_epi32(c0, x, w0); c1 = _mm512_dpbusd_epi32(c1, x, w1); \
    c2 = _mm512_dpbusd_epi32(c2, x, w2); c3 = _mm512_dpbusd_epi32(c3, x, w3);
static inline void block_4x64(const int8_t *const r[4], const int8_t *wb, int64_t kq, int64_t k, __m512i acc[16]) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512i c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    for (int64_t g = 0; g < kq; ++g) {
        const __m512i w0 = _mm512_loadu_si512(wb + g * 64), w1 = _mm512_loadu_si512(wb + (kq + g) * 64);
        const __m512i w2 = _mm512_loadu_si512(wb + (2 * kq + g) * 64), w3 = _mm512_loadu_si512(wb + (3 * kq + g) * 64);
        const __m512i x0 = codes4(r[0], g, k), x1 = codes4(r[1], g, k), x2 = codes4(r[2], g, k), x3 = codes4(r[3], g, k);
        STEP(x0, w0, w1, w2, w3, c00, c01, c02, c03)
        STEP(x1, w0, w1, w2, w3, c10, c11, c12, c13)
        STEP(x2, w0, w1, w2, w3, c20, c21, c22, c23)
        STEP(x3, w0, w1, w2, w3, c30, c31, c32, c33)
    }
    acc[0] = c00; acc[1] = c01; acc[2] = c02; acc[3] = c03; acc[4] = c10; acc[5] = c11; acc[6] = c12; acc[7] = c13;
    acc[8] = c20; acc[9] = c21; acc[10] = c22; acc[11] = c23; acc[12] = c30; acc[13] = c31; acc[14] = c32; acc[15] = c33;
}

/* y (m, n) float = ((float(X W^T) * sw[n]) * sx[m]) + bias[n], as qbench_amx_linear: X W^T is
   sum (X + 128) W - 128 wsum, exact in int32 (wrapping arithmetic, exact while |X W^T| < 2^31). */
int qbench_vnni_linear(const int8_t *x, int64_t m, int64_t k, const int8_t *wp, const int32_t *wsum, int64_t n,
                       const float *sw, const float *sx, const float *bias, float *y, int threads) {
    const int64_t kq = (k + 3) / 4, nb = (n + 15) / 16, mcb = (m + 31) / 32;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t mb = 0; mb < mcb; ++mb) {
        const int64_t m0 = mb * 32, m1 = m - m0 < 32 ? m : m0 + 32;
        for (int64_t j0 = 0; j0 < nb; j0 += 4) {  /* 4 blocks of 16 channels */
            const int64_t nj = nb - j0 < 4 ? nb - j0 : 4;
            const int8_t *wb = wp + j0 * kq * 64;
            for (int64_t r0 = m0; r0 < m1; r0 += 4) {  /* 4 rows */
                const int64_t nr = m1 - r0 < 4 ? m1 - r0 : 4;
                const int8_t *r[4];
                for (int i = 0; i < 4; ++i) r[i] = x + (r0 + (i < nr ? i : 0)) * k;  /* missing rows: not stored */
                __m512i acc[16];
                block_4x64(r, wb, kq, k, acc);  /* past n: zero weights, not stored */
                for (int64_t j = 0; j < nj; ++j) {
                    const int64_t n0 = (j0 + j) * 16;
                    const __mmask16 mask = n - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - n0)) - 1u);
                    const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512(wsum + n0), 7);  /* 128 wsum */
                    const __m512 s_w = _mm512_maskz_loadu_ps(mask, sw + n0);
                    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
                    for (int64_t i = 0; i < nr; ++i) {
                        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[4 * i + j], off)), s_w);
                        if (sx) v = _mm512_mul_ps(v, _mm512_set1_ps(sx[r0 + i]));
                        if (bias) v = _mm512_add_ps(v, b);
                        _mm512_mask_storeu_ps(y + (r0 + i) * n + n0, mask, v);
                    }
                }
            }
        }
    }
    return 0;
}
"""

COMMON_FLAGS = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fPIC", "-shared", "-fopenmp",
                "-ffp-contract=off", "-fno-fast-math", "-fno-finite-math-only"]
# kind: (source, extra compiler flags, CPU flags it needs, what a CPU without them lacks)
KINDS = {
    "amx": (AMX_SOURCE, ["-mamx-tile", "-mamx-int8"], {"amx_int8", "amx_tile"}, "AMX-INT8"),
    "vnni": (VNNI_SOURCE, ["-mavx512vnni"], {"avx512_vnni"}, "AVX-512 VNNI"),
}
PER_THREAD_ROWS = 64  # rows of output below which a call stays on one thread
_state: dict = {}


def library(kind: str):
    """(the loaded library of one kernel kind, None), or (None, why not) on this machine."""
    if kind not in _state:
        source, flags, needs, name = KINDS[kind]
        if not int8_native.cpu_flags() >= needs | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}:
            _state[kind] = None, f"no {name} on this CPU"
        else:
            try:
                lib = int8_native.build(f"int8_{kind}", source, COMMON_FLAGS + flags)
                i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                getattr(lib, f"qbench_{kind}_pack").argtypes = [ptr, i64, i64, ptr, ptr]
                getattr(lib, f"qbench_{kind}_linear").argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr,
                                                                  c_int]
                status = getattr(lib, f"qbench_{kind}_init")()
                if status != 0:
                    raise OSError(f"the kernel refused AMX tile data to this process (arch_prctl: {status})")
                _state[kind] = lib, None
            except (OSError, AttributeError) as err:
                _state[kind] = None, f"{type(err).__name__}: {str(err)[:200]}"
    return _state[kind]


class NativeLinear:
    """One layer's int8 weights (out, in) packed once for one kernel kind (`amx`, `vnni`),
    with its per-channel scales: `__call__(codes, x_scale=None, bias=None)` -> float32 (N, out)."""

    def __init__(self, kind: str, weight_codes: torch.Tensor, weight_scale: torch.Tensor):
        lib, why = library(kind)
        if lib is None:
            raise RuntimeError(f"the {kind} kernel is not available here: {why}")
        self.kind, self.lib = kind, lib
        self.out_features, self.in_features = weight_codes.shape
        weight_codes = weight_codes.to(torch.int8).contiguous()
        n, k = self.out_features, self.in_features
        size = ((n + 31) // 32) * 2 * ((k + 63) // 64) * 1024 if kind == "amx" else ((n + 63) // 64) * 4 * ((k + 3) // 4) * 64
        self.packed = torch.empty(size, dtype=torch.int8)
        self.weight_sums = torch.zeros(((n + 63) // 64) * 64, dtype=torch.int32)
        getattr(lib, f"qbench_{kind}_pack")(weight_codes.data_ptr(), n, k, self.packed.data_ptr(),
                                            self.weight_sums.data_ptr())
        self.run = getattr(lib, f"qbench_{kind}_linear")
        self.weight_scale = weight_scale.float().contiguous()

    def __call__(self, codes: torch.Tensor, x_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """codes (N, in) int8; x_scale (N, 1) float32 or None; bias (out,) float32 or None."""
        rows = codes.shape[0]
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != self.in_features:
            raise ValueError(f"the {self.kind} kernel takes int8 codes (N, {self.in_features})")
        codes = codes.contiguous()
        for name, t, size in (("x_scale", x_scale, rows), ("bias", bias, self.out_features)):
            if t is not None and (t.dtype != torch.float32 or t.numel() != size or not t.is_contiguous()):
                raise ValueError(f"{name} must be float32, contiguous, {size} values")
        y = torch.empty(rows, self.out_features)
        if rows:
            self.run(codes.data_ptr(), rows, self.in_features, self.packed.data_ptr(), self.weight_sums.data_ptr(),
                     self.out_features, self.weight_scale.data_ptr(), None if x_scale is None else x_scale.data_ptr(),
                     None if bias is None else bias.data_ptr(), y.data_ptr(),
                     max(1, min(torch.get_num_threads(), rows // PER_THREAD_ROWS)))
        return y
