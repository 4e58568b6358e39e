"""The low-precision attention kernel's two int8 GEMMs and their elementwise blocks as C
(AVX-512 VNNI intrinsics), built and loaded like qbench.quant.int8_native's quantizer.

Per (sequence, head):
  values: V's per-channel codes (with the dequantized V a value-reading gate reads, in the
          same pass); for a gate at the value position, round(255 g) / 255 times that V,
          re-quantized per channel, in one more call;
  K:      per-token codes (the native row quantizer's arithmetic) packed for VNNI, with their
          row sums and scales;
and for a chunk of queries:
  scores: each query row's per-token codes, then S = Q K^T exact in int32 (VNNI multiplies
          u8 x s8: Q's codes + 128 as u8, minus 128 sum_d K[j, d]), then the score block's
          float operations in its order: ((float(S) * (s_q s_k)) * scaling) + bias;
  context: P's codes round(255 p) as u8 (the kernel's uint8 codes before their -128 shift;
          a query that sees no key has NaN weights, coded as torch's cast codes them),
          P V exact in int32 (the same integer as P' V + 128 colsum(V)), then
          (float(acc) / 255) * s_v.
The normaliser (softmax, ...) stays the arm's own torch function between the two calls, so P
is the float path's.  Every float operation is the eager block's, rounded once each, no FMA
contraction: the output equals the eager kernel's bit for bit (tests/test_lowbit_attention.py).

Why: at T = 256 the kernel's time was fixed costs (8 per-head torch._int_mm calls of ~25 us,
5 compiled elementwise calls of ~30-120 us each, dynamo's guard checks and, at 2 threads, an
OpenMP fork and join per call) rather than arithmetic; a few calls here replace them (Q and
K quantized inside the calls that read them, the gate's passes in one).  No library has a
batched int8 x int8 -> int32 GEMM on the CPU (torch._int_mm is 2-D only; torch.bmm on int8
runs a reference loop, 3.6 ms at 4 x 256 x 64 x 256).
"""
from __future__ import annotations

import ctypes

import torch

from qbench.quant import int8_native

SOURCE = int8_native.QUOTIENT_C + r"""
#include <string.h>
#include <stdlib.h>
#include <omp.h>

#define MAX_D 1024  /* MAX_HEAD_DIM below */

/* One row of d floats (d % 16 == 0) -> int8 codes round(x / s), s = max(max |x|, 1e-8) / 127, as
   lowbit_attention.int8_codes(x, -1) computes them (an infinite x: s infinite, codes 0); a NaN in the
   row makes s NaN (its other codes then never reach the output: every score of the row or key is NaN). */
static inline float row_codes(const float *row, int64_t d, int8_t *out) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(row + c)));
    const float amax = _mm512_reduce_max_ps(m);
    const float s = (amax < 1e-8f ? 1e-8f : amax) / 127.0f;  /* clamp_min, then / 127 */
    const __m512 sv = _mm512_set1_ps(s), rv = _mm512_set1_ps(1.0f / s);
    __mmask16 nan = 0;
    for (int64_t c = 0; c < d; c += 16) {
        const __m512 q = qbench_quotient(_mm512_loadu_ps(row + c), rv, sv, &nan);
        /* to int8 through int32, the low byte, as torch's cast: a NaN quotient (an infinite x) codes 0 */
        _mm_storeu_si128((__m128i *)(out + c),
                         _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
    return nan ? NAN : s;
}

/* K (tk, d) float rows at k + j st, d % 16 == 0 -> its per-token codes packed as
   kp [tkb][d/4][16 keys][4 bytes] (zero padded to tkb * 16 keys), ksum[tkb * 16] = sum_d K[j, d]
   (0 for padding) and the scales ks[tk]. */
static void pack_k_one(const float *k, int64_t st, int64_t tk, int64_t d, int8_t *kp, int32_t *ksum, float *ks) {
    const int64_t tkb = (tk + 15) / 16, dq = d / 4;
    int32_t *kp32 = (int32_t *)kp;
    int8_t codes[MAX_D] __attribute__((aligned(64)));
    memset(kp, 0, (size_t)(tkb * dq * 64));
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    for (int64_t j = 0; j < tk; ++j) {
        ks[j] = row_codes(k + j * st, d, codes);
        const int32_t *row = (const int32_t *)codes;
        int32_t *dst = kp32 + (j / 16) * dq * 16 + (j % 16);
        for (int64_t g = 0; g < dq; ++g) dst[g * 16] = row[g];
        /* sum of the row's codes: of the u8 codes (s8 ^ 0x80 = s8 + 128) by SAD, minus 128 d */
        __m512i sums = zero;
        for (int64_t c = 0; c < d; c += 64) {
            const __mmask64 m = d - c >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (d - c)) - 1);
            /* masked-off bytes load as 0x00 and flip to 0x80: counted, then taken off below */
            sums = _mm512_add_epi64(sums, _mm512_sad_epu8(_mm512_xor_si512(_mm512_maskz_loadu_epi8(m, codes + c),
                                                                            flip), zero));
        }
        const int64_t padded = ((d + 63) / 64) * 64;
        ksum[j] = (int32_t)(_mm512_reduce_add_epi64(sums) - 128 * padded);
    }
    for (int64_t j = tk; j < tkb * 16; ++j) ksum[j] = 0;
}

/* k (B, H, tk, d) float at k + b sb + h sh + j st (rows of d contiguous) */
int qbench_attn_pack_k(const float *k, int64_t nb, int64_t nh, int64_t sb, int64_t sh, int64_t st, int64_t tk,
                       int64_t d, int8_t *kp, int32_t *ksum, float *ks, int threads) {
    const int64_t tkb = (tk + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t b = 0; b < nb * nh; ++b)
        pack_k_one(k + (b / nh) * sb + (b % nh) * sh, st, tk, d, kp + b * tkb * (d / 4) * 64, ksum + b * tkb * 16,
                   ks + b * tk);
    return 0;
}

/* scores (B H, tq, tk) float; q (B, H, tq, d) float at q + b q_sb + h q_sh + i q_st (rows of d
   contiguous), each row quantized here (row_codes); ks (B H, tk); bias (tq, tk) at
   bias + (b H + h) bias_stride (0: shared). */
int qbench_attn_scores(const float *q, int64_t q_sb, int64_t q_sh, int64_t q_st, int64_t nb, int64_t nh, int64_t tq,
                       int64_t d, const int8_t *kp, const int32_t *ksum, const float *ks, int64_t tk, float scaling,
                       const float *bias, int64_t bias_stride, float *out, int threads) {
    const int64_t bh = nb * nh;
    const int64_t tkb = (tk + 15) / 16, dq = d / 4;
    const __m512 scale_v = _mm512_set1_ps(scaling);
    const __m512i m128 = _mm512_set1_epi32(128);
    /* |Q K^T| <= 127 * 127 * d < 16384 d: below this |s_q s_k| every score is finite (NaN: never) */
    const __m512 limit = _mm512_set1_ps((float)(1e38 / (16384.0 * (double)d * fabs((double)scaling))));
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
    int8_t codes[MAX_D] __attribute__((aligned(64)));
    const int32_t *qrow = (const int32_t *)codes;
    #pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < bh; ++b) {
        for (int64_t i = 0; i < tq; ++i) {
            const int64_t sb = b / nh, sh = b % nh;
            const float qs = row_codes(q + sb * q_sb + sh * q_sh + i * q_st, d, codes);
            const int8_t *kpb = kp + b * tkb * dq * 64;
            const int32_t *ksb = ksum + b * tkb * 16;
            const float *ksc = ks + b * tk;
            const float *brow = bias + b * bias_stride + i * tk;
            float *orow = out + (b * tq + i) * tk;
            const __m512 qsv = _mm512_set1_ps(qs);
            for (int64_t jb0 = 0; jb0 < tkb; jb0 += 4) {  /* 4 blocks of 16 keys: 4 independent chains */
                const int64_t nb = tkb - jb0 < 4 ? tkb - jb0 : 4;
                /* keys all hidden (bias -inf; the future of a causal query) whose scores are finite
                   (s_q s_k within `limit`, not NaN): finite + -inf is -inf, so no products */
                int hidden = 1;
                for (int64_t x = 0; x < nb && hidden; ++x) {
                    const int64_t jb = jb0 + x, left = tk - jb * 16;
                    const __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                    const __m512 t = _mm512_abs_ps(_mm512_mul_ps(qsv, _mm512_maskz_loadu_ps(k, ksc + jb * 16)));
                    hidden = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, brow + jb * 16), minus_inf, _CMP_EQ_OQ) == k
                             && _mm512_mask_cmp_ps_mask(k, t, limit, _CMP_LE_OQ) == k;
                }
                if (hidden) {
                    for (int64_t x = 0; x < nb; ++x) {
                        const int64_t jb = jb0 + x, left = tk - jb * 16;
                        _mm512_mask_storeu_ps(orow + jb * 16, left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u),
                                              minus_inf);
                    }
                    continue;
                }
                __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                                  _mm512_setzero_si512()};
                const int8_t *blk = kpb + jb0 * dq * 64;
                if (nb == 4) {
                    for (int64_t g = 0; g < dq; ++g) {
                        const __m512i qb = _mm512_set1_epi32(qrow[g] ^ (int32_t)0x80808080);  /* s8 + 128 as u8 */
                        acc[0] = _mm512_dpbusd_epi32(acc[0], qb, _mm512_loadu_si512(blk + g * 64));
                        acc[1] = _mm512_dpbusd_epi32(acc[1], qb, _mm512_loadu_si512(blk + (dq + g) * 64));
                        acc[2] = _mm512_dpbusd_epi32(acc[2], qb, _mm512_loadu_si512(blk + (2 * dq + g) * 64));
                        acc[3] = _mm512_dpbusd_epi32(acc[3], qb, _mm512_loadu_si512(blk + (3 * dq + g) * 64));
                    }
                } else {
                    for (int64_t g = 0; g < dq; ++g) {
                        const __m512i qb = _mm512_set1_epi32(qrow[g] ^ (int32_t)0x80808080);
                        for (int64_t x = 0; x < nb; ++x)
                            acc[x] = _mm512_dpbusd_epi32(acc[x], qb, _mm512_loadu_si512(blk + (x * dq + g) * 64));
                    }
                }
                for (int64_t x = 0; x < nb; ++x) {
                    const int64_t jb = jb0 + x, left = tk - jb * 16;
                    const __m512i a = _mm512_sub_epi32(acc[x], _mm512_mullo_epi32(m128, _mm512_loadu_si512(ksb + jb * 16)));
                    const __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                    __m512 s = _mm512_cvtepi32_ps(a);
                    s = _mm512_mul_ps(s, _mm512_mul_ps(qsv, _mm512_maskz_loadu_ps(k, ksc + jb * 16)));
                    s = _mm512_mul_ps(s, scale_v);
                    s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(k, brow + jb * 16));
                    _mm512_mask_storeu_ps(orow + jb * 16, k, s);
                }
            }
        }
    }
    }
    return 0;
}

/* V's codes per channel (over the keys) of one (sequence, head), as lowbit_attention.int8_codes(v, -2):
   v (T, D) float at v + j st (channels contiguous), d % 16 == 0 -> codes (T, D) int8 contiguous and
   scale (D): max |v| over T, max(., 1e-8) / 127, round(v / s) as row_codes computes it (v * (1/s), the
   exact division where that lies near a tie), cast to int8 through int32 as torch does (a NaN
   channel: scale NaN, codes 0).  With `deq`, also codes * scale (the dequantized V a value-reading
   gate sees) at deq + j deq_st (NaN for a NaN channel, as torch's 0 * NaN). */
static void channel_codes(const float *base, int64_t st, int64_t t, int64_t d, int8_t *out, float *scale,
                          float *deq, int64_t deq_st) {
    for (int64_t x = 0; x < d / 16; ++x) {
        __m512 m = _mm512_setzero_ps();
        for (int64_t j = 0; j < t; ++j) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(base + j * st + x * 16)));
        const __m512 s = _mm512_div_ps(_mm512_max_ps(m, _mm512_set1_ps(1e-8f)), _mm512_set1_ps(127.0f));
        const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), s);
        __mmask16 nan = 0;
        for (int64_t j = 0; j < t; ++j) {
            const __m512 q = qbench_quotient(_mm512_loadu_ps(base + j * st + x * 16), r, s, &nan);
            const __m512i i = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(out + j * d + x * 16), _mm512_cvtepi32_epi8(i));
            if (deq) _mm512_storeu_ps(deq + j * deq_st + x * 16, _mm512_mul_ps(_mm512_cvtepi32_ps(i), s));
        }
        /* a NaN anywhere in the channel: eager's max is NaN, so are its scale and every code's
           quotient (codes 0 through the cast) */
        _mm512_storeu_ps(scale + x * 16, _mm512_mask_blend_ps(nan, s, _mm512_set1_ps(NAN)));
        if (nan)
            for (int64_t j = 0; j < t; ++j) {
                _mm_mask_storeu_epi8(out + j * d + x * 16, nan, _mm_setzero_si128());
                if (deq) _mm512_mask_storeu_ps(deq + j * deq_st + x * 16, nan, _mm512_set1_ps(NAN));
            }
    }
}

/* v (B, H, T, D) float at v + b sb + h sh + j st -> codes (B H, T, D), scale (B H, D); deq (or NULL)
   at deq + b deq_sb + h deq_sh + j deq_st. */
int qbench_attn_value_codes(const float *v, int64_t nb, int64_t nh, int64_t sb, int64_t sh, int64_t st, int64_t t,
                            int64_t d, int8_t *codes, float *scale, float *deq, int64_t deq_sb, int64_t deq_sh,
                            int64_t deq_st, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t bh = 0; bh < nb * nh; ++bh)
        channel_codes(v + (bh / nh) * sb + (bh % nh) * sh, st, t, d, codes + bh * t * d, scale + bh * d,
                      deq ? deq + (bh / nh) * deq_sb + (bh % nh) * deq_sh : deq, deq_st);
    return 0;
}

/* The gate at the value position: g V re-quantized, as the composition's eager blocks compute it:
   g' = round(255 g) / 255 (the gate's 8-bit codes), V' = float(code) * s_v (the dequantized V), then
   the codes of g' V' per channel (channel_codes).  g (B, H, T, 1 | D) at g + b g_sb + h g_sh + j g_st
   + c g_sc (g_sc 0: one gate per token and head); codes_in (B H, T, D), scale_in (B H, D). */
int qbench_attn_gated_value_codes(const int8_t *codes_in, const float *scale_in, const float *g, int64_t g_sb,
                                  int64_t g_sh, int64_t g_st, int64_t g_sc, int64_t nb, int64_t nh, int64_t t,
                                  int64_t d, int8_t *codes, float *scale, int threads) {
    int failed = 0;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        float *buf = (float *)aligned_alloc(64, (size_t)(((t * d * 4) + 63) / 64 * 64));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        const __m512 c255 = _mm512_set1_ps(255.0f);
        const __m512i channel = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                   _mm512_set1_epi32((int)g_sc));
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < nb * nh; ++bh) {
            if (!buf) continue;
            const int8_t *cin = codes_in + bh * t * d;
            const float *sin = scale_in + bh * d;
            const float *gb = g + (bh / nh) * g_sb + (bh % nh) * g_sh;
            for (int64_t j = 0; j < t; ++j)
                for (int64_t x = 0; x < d / 16; ++x) {
                    __m512 gv = g_sc == 1 ? _mm512_loadu_ps(gb + j * g_st + x * 16)
                              : g_sc ? _mm512_i32gather_ps(channel, gb + j * g_st + x * 16 * g_sc, 4)
                                     : _mm512_set1_ps(gb[j * g_st]);
                    gv = _mm512_div_ps(_mm512_roundscale_ps(_mm512_mul_ps(gv, c255), _MM_FROUND_TO_NEAREST_INT |
                                                                                      _MM_FROUND_NO_EXC), c255);
                    const __m512 vd = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(cin + j * d + x * 16)))),
                        _mm512_loadu_ps(sin + x * 16));
                    _mm512_storeu_ps(buf + j * d + x * 16, _mm512_mul_ps(gv, vd));
                }
            channel_codes(buf, d, t, d, codes + bh * t * d, scale + bh * d, NULL, 0);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* V (tk, d) int8, d % 16 == 0 -> vp [tkq][d/16][16 channels][4 keys] (zero padded to tkq * 4 keys). */
static void pack_v_one(const int8_t *v, int64_t tk, int64_t d, int8_t *vp) {
    const int64_t tkq = (tk + 3) / 4, db = d / 16;
    const int64_t full = tk / 4;
    /* 4 rows x 16 channels -> 16 channels x 4 rows: byte and word interleaves */
    for (int64_t jq = 0; jq < full; ++jq) {
        const int8_t *r = v + jq * 4 * d;
        for (int64_t x = 0; x < db; ++x) {
            const __m128i r0 = _mm_loadu_si128((const __m128i *)(r + x * 16));
            const __m128i r1 = _mm_loadu_si128((const __m128i *)(r + d + x * 16));
            const __m128i r2 = _mm_loadu_si128((const __m128i *)(r + 2 * d + x * 16));
            const __m128i r3 = _mm_loadu_si128((const __m128i *)(r + 3 * d + x * 16));
            const __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
            const __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
            __m128i *dst = (__m128i *)(vp + (jq * db + x) * 64);
            _mm_storeu_si128(dst, _mm_unpacklo_epi16(t0, t2));
            _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(t0, t2));
            _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(t1, t3));
            _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(t1, t3));
        }
    }
    if (tk % 4) {  /* the last, partial group of keys: zero padded */
        memset(vp + full * db * 64, 0, (size_t)(db * 64));
        for (int64_t j = full * 4; j < tk; ++j)
            for (int64_t c = 0; c < d; ++c)
                vp[(full * db + c / 16) * 64 + (c % 16) * 4 + (j % 4)] = v[j * d + c];
    }
}

int qbench_attn_pack_v(const int8_t *v, int64_t bh, int64_t tk, int64_t d, int8_t *vp, int threads) {
    const int64_t tkq = (tk + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t b = 0; b < bh; ++b) pack_v_one(v + b * tk * d, tk, d, vp + b * tkq * (d / 16) * 64);
    return 0;
}

/* out rows (B, H, tq, d) at out + (b / nh) o_sb + (b % nh) o_sh + i o_st (channels contiguous)
   = (float(sum_j round(255 p_ij) v_jd) / 255) * vs_d, b the (sequence, head) index;
   p (bh, tq, tk) contiguous, vs at vs + b * d. */
int qbench_attn_context(const float *p, int64_t bh, int64_t tq, int64_t tk, const int8_t *vp, int64_t d,
                        const float *vs, float *out, int64_t nh, int64_t o_sb, int64_t o_sh, int64_t o_st,
                        int threads) {
    const int64_t tkq = (tk + 3) / 4, db = d / 16;
    const __m512 c255 = _mm512_set1_ps(255.0f), c128 = _mm512_set1_ps(128.0f);
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        uint8_t codes[4096 + 64] __attribute__((aligned(64)));
        #pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < bh; ++b) {
            for (int64_t i = 0; i < tq; ++i) {
                const float *prow = p + (b * tq + i) * tk;
                const int8_t *vpb = vp + b * tkq * db * 64;
                float *orow = out + (b / nh) * o_sb + (b % nh) * o_sh + i * o_st;
              for (int64_t x0 = 0; x0 < db; x0 += 4) {  /* 4 blocks of 16 channels in registers */
                const int64_t nx = db - x0 < 4 ? db - x0 : 4;
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t j0 = 0; j0 < tk; j0 += 4096) {  /* P's codes in blocks of 4,096 keys */
                    const int64_t n = tk - j0 < 4096 ? tk - j0 : 4096;
                    int64_t used = 0;  /* keys up to the last block of nonzero codes (the rest add 0) */
                    for (int64_t j = 0; j < n; j += 16) {
                        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
                        /* as the eager block: round(255 p) - 128 in float, to int8 through int32 (the
                           low byte: a NaN row of a query that sees no key gives 0, as torch's cast
                           does), then + 128 as u8 (the byte's top bit flipped) */
                        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, prow + j0 + j), c255);
                        x = _mm512_sub_ps(_mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), c128);
                        const __m128i c = _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(x, _MM_FROUND_TO_NEAREST_INT |
                                                                                           _MM_FROUND_NO_EXC));
                        const __m128i u = _mm_xor_si128(c, _mm_set1_epi8((char)0x80));
                        _mm_storeu_si128((__m128i *)(codes + j), u);
                        if (!_mm_testz_si128(u, u)) used = j + 16 < n ? j + 16 : n;
                    }
                    for (int64_t j = n; j < ((n + 3) / 4) * 4; ++j) codes[j] = 0;
                    const int32_t *c32 = (const int32_t *)codes;
                    const int64_t groups = (used + 3) / 4;
                    if (nx == 4) {  /* 8 chains: even and odd groups of keys, summed exactly in int32 */
                        __m512i b0 = _mm512_setzero_si512(), b1 = b0, b2 = b0, b3 = b0;
                        int64_t jq = 0;
                        for (; jq + 1 < groups; jq += 2) {
                            const __m512i pb = _mm512_set1_epi32(c32[jq]), pc = _mm512_set1_epi32(c32[jq + 1]);
                            const int8_t *blk = vpb + ((j0 / 4 + jq) * db + x0) * 64;
                            a0 = _mm512_dpbusd_epi32(a0, pb, _mm512_loadu_si512(blk));
                            a1 = _mm512_dpbusd_epi32(a1, pb, _mm512_loadu_si512(blk + 64));
                            a2 = _mm512_dpbusd_epi32(a2, pb, _mm512_loadu_si512(blk + 128));
                            a3 = _mm512_dpbusd_epi32(a3, pb, _mm512_loadu_si512(blk + 192));
                            b0 = _mm512_dpbusd_epi32(b0, pc, _mm512_loadu_si512(blk + db * 64));
                            b1 = _mm512_dpbusd_epi32(b1, pc, _mm512_loadu_si512(blk + db * 64 + 64));
                            b2 = _mm512_dpbusd_epi32(b2, pc, _mm512_loadu_si512(blk + db * 64 + 128));
                            b3 = _mm512_dpbusd_epi32(b3, pc, _mm512_loadu_si512(blk + db * 64 + 192));
                        }
                        if (jq < groups) {
                            const __m512i pb = _mm512_set1_epi32(c32[jq]);
                            const int8_t *blk = vpb + ((j0 / 4 + jq) * db + x0) * 64;
                            a0 = _mm512_dpbusd_epi32(a0, pb, _mm512_loadu_si512(blk));
                            a1 = _mm512_dpbusd_epi32(a1, pb, _mm512_loadu_si512(blk + 64));
                            a2 = _mm512_dpbusd_epi32(a2, pb, _mm512_loadu_si512(blk + 128));
                            a3 = _mm512_dpbusd_epi32(a3, pb, _mm512_loadu_si512(blk + 192));
                        }
                        a0 = _mm512_add_epi32(a0, b0); a1 = _mm512_add_epi32(a1, b1);
                        a2 = _mm512_add_epi32(a2, b2); a3 = _mm512_add_epi32(a3, b3);
                    } else {
                        for (int64_t jq = 0; jq < groups; ++jq) {
                            const __m512i pb = _mm512_set1_epi32(c32[jq]);
                            const int8_t *blk = vpb + ((j0 / 4 + jq) * db + x0) * 64;
                            a0 = _mm512_dpbusd_epi32(a0, pb, _mm512_loadu_si512(blk));
                            if (nx > 1) a1 = _mm512_dpbusd_epi32(a1, pb, _mm512_loadu_si512(blk + 64));
                            if (nx > 2) a2 = _mm512_dpbusd_epi32(a2, pb, _mm512_loadu_si512(blk + 128));
                        }
                    }
                }
                const __m512i acc[4] = {a0, a1, a2, a3};
                for (int64_t x = 0; x < nx; ++x) {
                    __m512 o = _mm512_div_ps(_mm512_cvtepi32_ps(acc[x]), c255);
                    o = _mm512_mul_ps(o, _mm512_loadu_ps(vs + b * d + (x0 + x) * 16));
                    _mm512_storeu_ps(orow + (x0 + x) * 16, o);
                }
              }
            }
        }
    }
    return 0;
}
"""

FLAGS = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-fPIC", "-shared",
         "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-finite-math-only"]
MAX_HEAD_DIM = 1024  # 64 accumulators of 16 channels
PER_THREAD = 1 << 15  # elements of work below which a call stays on one thread
_state: dict = {}


def library():
    """(the loaded library, None), or (None, why not) on this machine."""
    if "lib" not in _state:
        if not int8_native.cpu_flags() >= {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}:
            _state["lib"], _state["why"] = None, "no AVX-512 VNNI on this CPU"
        else:
            try:
                lib = int8_native.build("attention", SOURCE, FLAGS)
                i64, ptr, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
                lib.qbench_attn_pack_k.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, c_int]
                lib.qbench_attn_scores.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64,
                                                   c_float, ptr, i64, ptr, c_int]
                lib.qbench_attn_pack_v.argtypes = [ptr, i64, i64, i64, ptr, c_int]
                lib.qbench_attn_context.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, c_int]
                lib.qbench_attn_value_codes.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64,
                                                        i64, i64, c_int]
                lib.qbench_attn_gated_value_codes.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64,
                                                              ptr, ptr, c_int]
                _state["lib"], _state["why"] = lib, None
            except (OSError, AttributeError) as err:
                _state["lib"], _state["why"] = None, f"{type(err).__name__}: {str(err)[:200]}"
    return _state["lib"], _state["why"]


def supported(q: torch.Tensor, v_codes: torch.Tensor) -> bool:
    """Shapes and types the C blocks take: float32 CPU queries, head width a multiple of 16."""
    d = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype == torch.float32 and d % 16 == 0 and d <= MAX_HEAD_DIM
            and v_codes.shape[-1] == d and library()[0] is not None)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) as rows of D in any layout (the projection's (B, T, H, D) seen as (B, H,
    T, D) too): the C blocks read it through its strides."""
    return x if x.stride(-1) == 1 else x.contiguous()


def value_codes(v: torch.Tensor, dequantized: bool = False):
    """lowbit_attention.int8_codes(v, -2) for v (B, H, T, D) float32 (rows of D in any layout):
    (codes (B, H, T, D) int8 contiguous, scale (B, H, 1, D)); with `dequantized`, also
    codes * scale (B, H, T, D) float32 in the value projection's (B, T, H, D) memory layout
    (what a value-reading gate reads: flattening it is a view), from the same call."""
    b, h, t, d = v.shape
    v = _rows(v)
    codes = torch.empty(b, h, t, d, dtype=torch.int8)
    scale = torch.empty(b, h, 1, d)
    deq = torch.empty(b, t, h, d).transpose(1, 2) if dequantized else None
    if v.numel():
        library()[0].qbench_attn_value_codes(v.data_ptr(), b, h, v.stride(0), v.stride(1), v.stride(2), t, d,
                                             codes.data_ptr(), scale.data_ptr(),
                                             None if deq is None else deq.data_ptr(),
                                             *(deq.stride()[:3] if deq is not None else (0, 0, 0)),
                                             int8_native.threads_for(v.numel(), PER_THREAD))
    return (codes, scale) if deq is None else (codes, scale, deq)


def gated_value_codes(g: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor):
    """The gate at the value position on V's codes, in one call: the codes and scales of
    int8_codes(round(255 g) / 255 * (codes * scale), -2), as the kernel's torch blocks compute
    them.  g (B, H, T, 1 | D) float32 (any strides), codes (B, H, T, D) int8, scale (B, H, 1, D)."""
    b, h, t, d = codes.shape
    codes, scale = codes.contiguous(), scale.expand(b, h, 1, d).contiguous()
    g = g.expand(b, h, t, g.shape[-1])
    out, out_scale = torch.empty_like(codes), torch.empty_like(scale)
    if codes.numel():
        failed = library()[0].qbench_attn_gated_value_codes(
            codes.data_ptr(), scale.data_ptr(), g.data_ptr(), *g.stride()[:3], g.stride(3) if g.shape[-1] == d else 0,
            b, h, t, d, out.data_ptr(), out_scale.data_ptr(), int8_native.threads_for(codes.numel(), PER_THREAD))
        if failed:
            raise MemoryError(f"gated value codes: no memory for a ({t}, {d}) float buffer")
    return out, out_scale


def gate_supported(g: torch.Tensor, codes: torch.Tensor) -> bool:
    """What gated_value_codes takes: a float32 CPU gate, one per (token, head) or per channel,
    on CPU codes of a head width that is a multiple of 16."""
    d = codes.shape[-1]
    return (g.device.type == "cpu" and codes.device.type == "cpu" and g.dtype == torch.float32 and g.dim() == 4
            and g.shape[-1] in (1, d) and d % 16 == 0 and d <= MAX_HEAD_DIM and library()[0] is not None)


class Packed:
    """K's per-token codes (quantized here, from float) and V's codes of every (sequence, head),
    packed once per call for the VNNI blocks."""

    def __init__(self, k: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor):
        lib = library()[0]
        b, h, tk, d = k.shape
        self.bh, self.tk, self.d = b * h, tk, d
        k = _rows(k)
        v_codes = v_codes.contiguous()
        tkb, tkq = (tk + 15) // 16, (tk + 3) // 4
        self.kp = torch.empty(self.bh * tkb * (d // 4) * 64, dtype=torch.int8)
        self.ksum = torch.empty(self.bh * tkb * 16, dtype=torch.int32)
        self.k_scale = torch.empty(self.bh * tk)
        self.vp = torch.empty(self.bh * tkq * (d // 16) * 64, dtype=torch.int8)
        threads = int8_native.threads_for(self.bh * tk * d, PER_THREAD)
        lib.qbench_attn_pack_k(k.data_ptr(), b, h, k.stride(0), k.stride(1), k.stride(2), tk, d, self.kp.data_ptr(),
                               self.ksum.data_ptr(), self.k_scale.data_ptr(), threads)
        lib.qbench_attn_pack_v(v_codes.data_ptr(), self.bh, tk, d, self.vp.data_ptr(), threads)
        self.v_scale = v_scale.expand(b, h, 1, d).contiguous()

    def scores(self, q: torch.Tensor, scaling: float, bias: torch.Tensor) -> torch.Tensor:
        """q (B, H, Tq, D) float32 (rows of D in any layout), a chunk of queries, quantized per
        token here; bias broadcastable to (B, H, Tq, Tk) -> scores (B, H, Tq, Tk)."""
        b, h, tq, d = q.shape
        q = _rows(q)
        if bias.dim() == 2 or all(n == 1 for n in bias.shape[:-2]):
            bias_rows, bias_stride = bias.reshape(tq, self.tk).contiguous(), 0
        else:
            bias_rows, bias_stride = bias.expand(b, h, tq, self.tk).contiguous(), tq * self.tk
        out = torch.empty(b, h, tq, self.tk)
        library()[0].qbench_attn_scores(
            q.data_ptr(), *q.stride()[:3], b, h, tq, d, self.kp.data_ptr(), self.ksum.data_ptr(),
            self.k_scale.data_ptr(), self.tk, scaling, bias_rows.data_ptr(), bias_stride, out.data_ptr(),
            int8_native.threads_for(self.bh * tq * self.tk, PER_THREAD))
        return out

    def context_into(self, p: torch.Tensor, out: torch.Tensor) -> None:
        """P (B, H, Tq, Tk) in [0, 1] -> (P V) written into `out` (B, H, Tq, D) float32 whose
        channels are contiguous (any layout of rows: the heads-merged (B, T, H, D) too)."""
        b, h, tq, tk = p.shape
        p = p.contiguous()
        if out.stride(-1) != 1 or out.dtype != torch.float32 or tuple(out.shape) != (b, h, tq, self.d):
            raise ValueError("out must be float32 (B, H, Tq, D) with contiguous channels")
        library()[0].qbench_attn_context(p.data_ptr(), self.bh, tq, tk, self.vp.data_ptr(), self.d,
                                         self.v_scale.data_ptr(), out.data_ptr(), h, *out.stride()[:3],
                                         int8_native.threads_for(self.bh * tq * tk, PER_THREAD))
