"""The int8 W8A8 linear on AMX tiles, with the rescale in the GEMM's epilogue: one C call
(Intel AMX-INT8 intrinsics) built at first use like qbench.quant.int8_native's quantizer.

y[m, n] = ((float(sum_k X[m, k] W[n, k]) * s_w[n]) * s_x[m]) + b[n]: the integer product
exact in int32 (`tdpbssd`, signed x signed), then the same three float roundings, in the
same order, as the other kernels' `_int_mm(...).float() * s_w` followed by the layer's
rescale (`y * s_x + b`).  Weights are packed once per layer into AMX's tile layout (16
output channels x 64 reduction bytes per tile, zero padded to whole tiles); the codes are
read as they are (32 rows x 64 bytes per pair of tiles, tails through a zero-padded copy).
Each thread configures its tiles and takes whole blocks of 32 rows; a block's four 16 x 16
int32 accumulators become float output in L1, so the GEMM's output is written once.

Why: oneDNN's prepacked qlinear (the kernel it replaces where it measures faster) takes one
activation scale per call, so the per-token rescale is a second pass over the output, and
each call costs ~23 us of fixed primitive handling; at SmolLM2's narrow 576 -> 192
projection those were a third of the layer's time.  No library exposes an int8 GEMM with a
per-row scale in its epilogue on the CPU (torch._int_mm returns int32; torchao's and
optimum-quanto's int8 paths rescale in separate passes, results/PERF_QUANT.md).

Available where the CPU reports amx_int8 and amx_tile, the compiler takes -mamx-int8, and
the kernel lets the process use the tile data (Linux's arch_prctl permission); int8_gemm
checks its exactness and times it against the other candidates like any kernel.
"""
from __future__ import annotations

import ctypes

import torch

from qbench.quant import int8_native

SOURCE = r"""
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
void qbench_amx_pack(const int8_t *w, int64_t n, int64_t k, int8_t *wp) {
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
int qbench_amx_linear(const int8_t *x, int64_t m, int64_t k, const int8_t *wp, int64_t n, const float *sw,
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

FLAGS = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mamx-tile", "-mamx-int8", "-fPIC",
         "-shared", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-finite-math-only"]
PER_THREAD_ROWS = 64  # rows of output below which a call stays on one thread
_state: dict = {}


def library():
    """(the loaded library, None), or (None, why not) on this machine."""
    if "lib" not in _state:
        flags = int8_native.cpu_flags()
        if not flags >= {"amx_int8", "amx_tile", "avx512f", "avx512bw", "avx512vl", "avx512dq"}:
            _state["lib"], _state["why"] = None, "no AMX-INT8 on this CPU"
        else:
            try:
                lib = int8_native.build("amx", SOURCE, FLAGS)
                i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                lib.qbench_amx_pack.argtypes = [ptr, i64, i64, ptr]
                lib.qbench_amx_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, c_int]
                status = lib.qbench_amx_init()
                if status != 0:
                    raise OSError(f"the kernel refused AMX tile data to this process (arch_prctl: {status})")
                _state["lib"], _state["why"] = lib, None
            except (OSError, AttributeError) as err:
                _state["lib"], _state["why"] = None, f"{type(err).__name__}: {str(err)[:200]}"
    return _state["lib"], _state["why"]


class AmxLinear:
    """One layer's int8 weights (out, in) packed once into AMX tiles, with its per-channel
    scales: `__call__(codes, x_scale=None, bias=None)` -> float32 (N, out)."""

    def __init__(self, weight_codes: torch.Tensor, weight_scale: torch.Tensor):
        lib, why = library()
        if lib is None:
            raise RuntimeError(f"the AMX kernel is not available here: {why}")
        self.out_features, self.in_features = weight_codes.shape
        weight_codes = weight_codes.to(torch.int8).contiguous()
        blocks, chunks = ((self.out_features + 31) // 32) * 2, (self.in_features + 63) // 64
        self.packed = torch.empty(blocks * chunks * 1024, dtype=torch.int8)
        lib.qbench_amx_pack(weight_codes.data_ptr(), self.out_features, self.in_features, self.packed.data_ptr())
        self.weight_scale = weight_scale.float().contiguous()

    def __call__(self, codes: torch.Tensor, x_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """codes (N, in) int8; x_scale (N, 1) float32 or None; bias (out,) float32 or None."""
        rows = codes.shape[0]
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != self.in_features:
            raise ValueError(f"the AMX kernel takes int8 codes (N, {self.in_features})")
        codes = codes.contiguous()
        for name, t, size in (("x_scale", x_scale, rows), ("bias", bias, self.out_features)):
            if t is not None and (t.dtype != torch.float32 or t.numel() != size or not t.is_contiguous()):
                raise ValueError(f"{name} must be float32, contiguous, {size} values")
        y = torch.empty(rows, self.out_features)
        if rows:
            library()[0].qbench_amx_linear(
                codes.data_ptr(), rows, self.in_features, self.packed.data_ptr(), self.out_features,
                self.weight_scale.data_ptr(), None if x_scale is None else x_scale.data_ptr(),
                None if bias is None else bias.data_ptr(), y.data_ptr(),
                max(1, min(torch.get_num_threads(), rows // PER_THREAD_ROWS)))
        return y
