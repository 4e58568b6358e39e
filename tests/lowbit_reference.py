"""The low-precision kernel as it was before vectorisation (one (sequence, head) block at a
time, Python loops), kept as the slow reference the vectorised kernel must equal.  Only
change: the block's normaliser is the arm's (it was softmax / clipped softmax)."""
from __future__ import annotations

import torch

from qbench.quant.lowbit_attention import int8_codes, int_matmul, quantize_gate, quantize_probs


class ReferenceLowBitAttention:
    def __init__(self, probs: str = "int8", qkv_granularity: str = "token"):
        self.probs, self.qkv_granularity = probs, qkv_granularity

    def _quantize_qk(self, x):
        return int8_codes(x, dim=-1 if self.qkv_granularity == "token" else None)

    def _quantize_v(self, v):
        return int8_codes(v, dim=0 if self.qkv_granularity == "token" else None)  # per channel

    def block(self, q, k, v_codes, v_scale, scaling, normalise, module):
        """One head of one sequence: q, k (T, D) float; V as int8 codes + scales -> (T, D)."""
        t_q, t_k = q.shape[0], k.shape[0]
        q_codes, q_scale = self._quantize_qk(q)
        k_codes, k_scale = self._quantize_qk(k)
        scores = int_matmul(q_codes, k_codes.t()).float() * (q_scale * k_scale.reshape(1, -1)) * scaling
        causal = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)
        scores = scores.masked_fill(~causal, float("-inf"))
        head = getattr(self, "_head", 0)
        p = normalise(scores[None, None], _OneHead(module, head))[0, 0]
        p_q = quantize_probs(p, self.probs)
        if self.probs == "int8":
            shifted = (p_q - 128).to(torch.int8)
            column_sums = v_codes.to(torch.int32).sum(dim=0, keepdim=True)
            acc = int_matmul(shifted, v_codes) + 128 * column_sums
            return acc.float() / 255.0 * v_scale.reshape(1, -1)
        return p_q @ (v_codes.float() * v_scale.reshape(1, -1))

    def attend(self, module, x, q, k, v):
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
            gate = quantize_gate(module.gate(x, v_deq.transpose(1, 2).reshape(b, t, h * d)))
        out = torch.empty_like(q)
        for bi in range(b):
            for hi in range(h):
                codes, scale = v_codes[bi * h + hi], v_scales[bi * h + hi]
                if gate is not None and arm.gate_position == "value":
                    codes, scale = self._quantize_v(gate[bi, hi] * v_deq[bi, hi])
                self._head = hi
                o = self.block(q[bi, hi], k[bi, hi], codes, scale, d ** -0.5, arm.normalise, module)
                if gate is not None and arm.gate_position == "output":
                    o = gate[bi, hi] * o
                out[bi, hi] = o
        return out


class _OneHead:
    """The module's normaliser parameters restricted to one head (the sink logit is per head)."""

    def __init__(self, module, head):
        self.clip_alpha = module.clip_alpha
        self.sigmoid_bias = module.sigmoid_bias
        if hasattr(module, "sink_logit"):
            self.sink_logit = module.sink_logit[head:head + 1]
