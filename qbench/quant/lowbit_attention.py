"""The low-precision gated-attention kernel: every arm's attention computed in 8 bits.

Per (batch, head) block, so no more than one T x T block exists at a time:
  Q, K int8 (per-token scales, or one scale per head);  V int8 (per-channel scales within
  the head, or one per head: a per-token scale could not leave the P V sum);
  S = Q K^T as an int8 x int8 -> int32 matmul, rescaled by s_q s_k / sqrt(d);
  P = softmax(S) (or the clipped softmax) in float, then quantized to 8 bits: unsigned
  codes with scale 1/255, or float8 e4m3;
  O = P V as an 8-bit matmul (uint8 codes are shifted by -128 into int8 and the shift is
  added back exactly: P V = (P' + 128) V = P' V + 128 colsum(V));
  gates: VGA's gate is computed from the *quantized* V and quantized to 8 bits (scale
  1/255); key side it scales V (re-quantized to int8) before P V, output side it scales
  O; IGA / G1 gates come from the input and are applied to O the same way.
A float reference (the arm functions in qbench.modeling.attention) sits beside it.
"""
from __future__ import annotations

import math

import torch

from qbench.modeling.attention import clipped_softmax

INT8_MAX = 127


def int8_codes(x: torch.Tensor, dim: int | tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and scales (max|x| / 127 over `dim`, keepdim; whole tensor if None)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp_min(1e-8) / INT8_MAX
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX).to(torch.int8), scale


# Partial sums of int8 x int8 products stay exact in fp32 while |sum| < 2^24:
# K * 128 * 128 < 2^24 holds for K <= 1024 (Q K^T: K = head width; P V: K = T).
EXACT_FP32_K = 2**24 // (128 * 128)


def _has_int8_units() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in capability or "AMX" in capability


INT8_UNITS = _has_int8_units()


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) x int8 (K, N) -> int32, exact.  torch._int_mm where the CPU has int8
    dot-product units (AVX-512 VNNI / AMX); on AVX2-only CPUs _int_mm takes a slow
    reference path, so the same integers are computed by the fp32 GEMM, which is exact
    while K <= 1024 (each partial sum below 2^24), in K-chunks otherwise."""
    if INT8_UNITS:
        return torch._int_mm(a.contiguous(), b)
    out = None
    for start in range(0, a.shape[1], EXACT_FP32_K):
        part = (a[:, start:start + EXACT_FP32_K].float() @ b[start:start + EXACT_FP32_K].float()).to(torch.int32)
        out = part if out is None else out + part
    return out


def quantize_probs(p: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return torch.round(p * 255.0)  # codes 0..255, scale 1/255
    if fmt == "fp8":
        return p.to(torch.float8_e4m3fn).float()
    raise ValueError(f"probability format must be 'int8' or 'fp8', got {fmt!r}")


def quantize_gate(g: torch.Tensor) -> torch.Tensor:
    return torch.round(g * 255.0) / 255.0


class LowBitAttention:
    """Attached to attention modules (ours as `.kernel`, stock HF ones as `.qbench_kernel`)."""

    def __init__(self, probs: str = "int8", qkv_granularity: str = "token"):
        if qkv_granularity not in ("token", "head"):
            raise ValueError(f"qkv_granularity must be 'token' or 'head', got {qkv_granularity!r}")
        quantize_probs(torch.zeros(1), probs)  # validates the format
        self.probs, self.qkv_granularity = probs, qkv_granularity
        # Probes may set a callable receiving (module, head index, P block (T, T)) per block.
        self.observer = None

    # -- the block computation, shared by every arm ----------------------------------
    def _quantize_qk(self, x: torch.Tensor):
        return int8_codes(x, dim=-1 if self.qkv_granularity == "token" else None)

    def _quantize_v(self, v: torch.Tensor):
        return int8_codes(v, dim=0 if self.qkv_granularity == "token" else None)  # per channel

    def block(self, q: torch.Tensor, k: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
              scaling: float, additive_mask: torch.Tensor | None, clip_alpha: float | None,
              module=None, head: int = 0) -> torch.Tensor:
        """One head of one sequence: q, k (T, D) float; V as int8 codes + scales -> (T, D)."""
        t_q, t_k = q.shape[0], k.shape[0]
        q_codes, q_scale = self._quantize_qk(q)
        k_codes, k_scale = self._quantize_qk(k)
        scores = int_matmul(q_codes, k_codes.t()).float() * (q_scale * k_scale.reshape(1, -1)) * scaling
        if additive_mask is not None:
            scores = scores.masked_fill(additive_mask, float("-inf"))
        else:
            causal = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
            scores = scores.masked_fill(~causal, float("-inf"))
        p = clipped_softmax(scores, clip_alpha) if clip_alpha is not None else torch.softmax(scores, dim=-1)
        if self.observer is not None:
            self.observer(module, head, p)
        p_q = quantize_probs(p, self.probs)
        if self.probs == "int8":
            shifted = (p_q - 128).to(torch.int8)  # uint8 codes as int8, exact shift
            column_sums = v_codes.to(torch.int32).sum(dim=0, keepdim=True)  # (1, D)
            acc = int_matmul(shifted, v_codes) + 128 * column_sums
            return acc.float() / 255.0 * v_scale.reshape(1, -1)
        return p_q @ (v_codes.float() * v_scale.reshape(1, -1))  # fp8 P: products exact in fp32

    # -- our model family: every arm -----------------------------------------------
    def attend(self, module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               v_full: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) context for QBenchAttention `module` (its arm, gate and clip)."""
        b, h, t, d = q.shape
        arm = module.arm
        v_deq, v_codes, v_scales = torch.empty_like(v), [], []
        for bi in range(b):
            for hi in range(h):
                codes, scale = self._quantize_v(v[bi, hi])
                v_codes.append(codes)
                v_scales.append(scale)
                v_deq[bi, hi] = codes.float() * scale
        gate = None
        if arm.gate_source is not None:
            if arm.gate_source == "value":  # VGA: the gate sees the quantized values
                merged = v_deq.transpose(1, 2).reshape(b, t, h * d)
                logits = module.gate_proj(merged).view(b, t, h, -1).transpose(1, 2)
                gate = torch.sigmoid(logits)
            else:
                gate = module.gate(x, v_full)
            gate = quantize_gate(gate)  # (B, H, T, 1 | D), 8-bit unsigned
        out = torch.empty_like(q)
        for bi in range(b):
            for hi in range(h):
                idx = bi * h + hi
                codes, scale = v_codes[idx], v_scales[idx]
                if gate is not None and arm.gate_position == "value":
                    codes, scale = self._quantize_v(gate[bi, hi] * v_deq[bi, hi])  # g_j V_j, re-quantized
                o = self.block(q[bi, hi], k[bi, hi], codes, scale, 1.0 / math.sqrt(d), None,
                               module.clip_alpha, module, hi)
                if gate is not None and arm.gate_position == "output":
                    o = gate[bi, hi] * o
                out[bi, hi] = o
        return out

    # -- stock HF attention (softmax arm) through the registry ----------------------
    def __call__(self, query, key, value, attention_mask=None, scaling=None):
        b, h, t, d = query.shape
        scaling = scaling if scaling is not None else d ** -0.5
        out = torch.empty_like(query)
        for bi in range(b):
            mask = None
            if attention_mask is not None:
                m = attention_mask[bi, 0] if attention_mask.dim() == 4 else attention_mask[bi]
                mask = ~m if m.dtype == torch.bool else m <= torch.finfo(m.dtype).min / 2
            for hi in range(h):
                codes, scale = self._quantize_v(value[bi, hi].float())
                out[bi, hi] = self.block(query[bi, hi].float(), key[bi, hi].float(), codes, scale, scaling,
                                         mask, None, None, hi).to(query.dtype)
        return out


def install_kernel(model: torch.nn.Module, kernel: LowBitAttention) -> int:
    """Attach the kernel to every attention module: ours directly, stock HF through the registry."""
    from qbench.modeling.model import QBenchAttention

    ours = [m for m in model.modules() if isinstance(m, QBenchAttention)]
    for module in ours:
        module.kernel = kernel
    if ours:
        return len(ours)
    from qbench.quant.attention_registry import install_attention

    modules = install_attention(model)
    for module in modules:
        module.qbench_kernel = kernel
    return len(modules)
