"""Attention arms: one plain function per arm, plus the table that names them.

Shapes: q, k, v are (B, H, T, D); gates are (B, H, T, 1) (one per head per token) or
(B, H, T, D) (elementwise); every function returns the per-head context (B, H, T, D)
before the output projection.

`sites` lets a quantizer or a probe see (and replace) the intermediate tensors that the
Bondarenko protocol quantizes: the scores Q K^T, the probabilities P and the context P V.
With no sites the arms run through PyTorch's fused SDPA where the math allows it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class AttentionSites(Protocol):
    def scores(self, x: torch.Tensor) -> torch.Tensor: ...
    def probs(self, x: torch.Tensor) -> torch.Tensor: ...
    def context(self, x: torch.Tensor) -> torch.Tensor: ...


def causal_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q K^T / sqrt(d_h) with the causal mask applied as -inf.  (B, H, T, T)"""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(_future(q.shape[-2], k.shape[-2], q.device), float("-inf"))


@functools.lru_cache(maxsize=32)
def _future(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """True where query i may not see key j (j > i + t_k - t_q); cached per shape."""
    return ~torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def first_column_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal SDPA output (B, H, T, D) and P[..., 0] (B, H, T), the probability each query
    gives token 0, without materialising P.  On the CPU the flash kernel also returns each
    row's log-sum-exp, so P_i0 = exp(q_i . k_0 / sqrt(d) - lse_i) costs one dot product per
    query.  Elsewhere an extra value channel that is 1 at token 0 and 0 elsewhere comes out
    of the same kernel as sum_j P_ij [j = 0] = P_i0 (slower: the head width changes)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.device.type == "cpu" and q.shape[-2] == k.shape[-2] and hasattr(torch.ops.aten, _CPU_FLASH):
        out, lse = getattr(torch.ops.aten, _CPU_FLASH)(q, k, v, 0.0, True)[:2]
        first = torch.exp((q @ k[..., :1, :].transpose(-1, -2))[..., 0].float() * scale - lse.float())
        return out, first.to(q.dtype)
    marker = torch.zeros(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    marker[..., 0, :] = 1.0
    out = F.scaled_dot_product_attention(q, k, torch.cat([v, marker], dim=-1), is_causal=True)
    return out[..., :-1], out[..., -1]


_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def clipped_softmax(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bondarenko et al. 2023: clip((zeta - gamma) softmax(x) + gamma, 0, 1), zeta=1, gamma=-alpha/T."""
    gamma = -alpha / scores.shape[-1]
    return torch.clamp((1.0 - gamma) * torch.softmax(scores, dim=-1) + gamma, 0.0, 1.0)


def _weighted_sum(q, k, v, sites: AttentionSites | None, clip_alpha: float | None):
    """P V for softmax or clipped-softmax probabilities.  (B, H, T, D)"""
    if sites is None and clip_alpha is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if clip_alpha is None and getattr(sites, "first_column_only", False):
        # An observer that needs only P[..., 0] (token 0's share, for the sink probes): the
        # output stays on the fused kernel, and P_i0 comes from it too (first_column_sdpa).
        out, first = first_column_sdpa(q, k, v)
        sites.first_column(first)
        return out
    scores = causal_scores(q, k)
    if sites is not None:
        scores = sites.scores(scores)
    if clip_alpha is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = clipped_softmax(scores, clip_alpha)
    if sites is not None:
        probs = sites.probs(probs)
    context = probs @ v
    return sites.context(context) if sites is not None else context


def softmax_attention(q, k, v, gate=None, *, sites=None, clip_alpha=None):
    """Vanilla: O = softmax(Q K^T / sqrt(d)) V."""
    return _weighted_sum(q, k, v, sites, None)


def vga_attention(q, k, v, gate, *, sites=None, clip_alpha=None):
    """VGA key side (Eq. 6): O = softmax(Q K^T / sqrt(d)) (g * V); each token j scales its own value."""
    return _weighted_sum(q, k, gate * v, sites, None)


def vga_out_attention(q, k, v, gate, *, sites=None, clip_alpha=None):
    """VGA output side (appendix B code): row i of the output scaled by the query token's g_i."""
    return gate * _weighted_sum(q, k, v, sites, None)


def iga_attention(q, k, v, gate, *, sites=None, clip_alpha=None):
    """Bondarenko gated attention: the head's output scaled by pi = sigmoid(G_h(x_h))."""
    return gate * _weighted_sum(q, k, v, sites, None)


def qwen_g1_attention(q, k, v, gate, *, sites=None, clip_alpha=None):
    """Qiu et al. 2025 G1: Y' = Y * sigmoid(X W_theta) on the SDPA output."""
    return gate * _weighted_sum(q, k, v, sites, None)


def clipped_attention(q, k, v, gate=None, *, sites=None, clip_alpha=4.0):
    """Clipped softmax attention: exact zeros (and ones) become reachable."""
    return _weighted_sum(q, k, v, sites, clip_alpha)


@dataclass(frozen=True)
class AttentionArm:
    name: str
    function: Callable
    # Where the gate's input comes from: None (no gate), "value" (the full value
    # projection V, VGA), "input_head" (the head's slice of the normed input, IGA) or
    # "input" (the whole normed input, Qwen G1).
    gate_source: str | None
    # "value": the gate scales V_j before the weighted sum; "output": it scales O_i.
    gate_position: str | None
    description: str


ATTENTION_ARMS: dict[str, AttentionArm] = {
    arm.name: arm
    for arm in [
        AttentionArm("softmax", softmax_attention, None, None, "vanilla softmax attention"),
        AttentionArm("vga", vga_attention, "value", "value",
                     "Value-State Gated Attention, key side (Eq. 6): softmax(QK^T) @ (sigmoid(V W_g) * V)"),
        AttentionArm("vga_out", vga_out_attention, "value", "output",
                     "VGA, output side (appendix B): sigmoid(V W_g)_i * softmax(QK^T) V"),
        AttentionArm("iga", iga_attention, "input_head", "output",
                     "Bondarenko gated attention: per-head Linear(d_head->1) gate on the normed input"),
        AttentionArm("qwen_g1", qwen_g1_attention, "input", "output",
                     "Qiu et al. G1: sigmoid(X W) gate on the SDPA output, X the normed input"),
        AttentionArm("clipped", clipped_attention, None, None,
                     "Bondarenko clipped softmax, zeta=1, gamma=-alpha/T"),
    ]
}
