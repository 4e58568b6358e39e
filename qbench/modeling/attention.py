"""Attention arms as data: a score normaliser and an optional gate.

An arm (`AttentionArm`) names
  - a **normaliser** that turns masked scores S = Q K^T / sqrt(d) (future keys at -inf)
    into attention weights P: softmax, clipped softmax, softpick, sigmoid, softmax with a
    sink logit (`NORMALISERS`);
  - an optional **gate** sigmoid(Z W + b): its input Z (`value`: the full value projection
    V; `input_head`: the head's slice of the normed input; `input`: the whole normed
    input) and its position (`value`: it scales V_j before the weighted sum, so a token
    gates what it contributes as a key; `output`: it scales O_i, so a token gates what it
    reads as a query);
  - the gate's initial value and the formula shown by `qbench list attention`.

qbench.modeling.compose composes them (scores, soft-cap, masks, normaliser, gate) for
every caller, the float path and the low-precision kernel's blocks
(`qbench.quant.lowbit_attention`) alike.  Adding an arm is one `AttentionArm` entry (plus
its normaliser if new, and the learnable tensors that normaliser reads in
`NORMALISER_PARAMETERS`: the qbench model and the retrofit create them from there).

Shapes: q, k, v are (B, H, T, D); gates are (B, H, T, 1) (one per head per token) or
(B, H, T, D) (elementwise); the result is the per-head context (B, H, T, D) before the
output projection.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def causal_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q K^T / sqrt(d_h) with the causal mask applied as -inf.  (B, H, T, T)"""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(future_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))


@functools.lru_cache(maxsize=32)
@functools.lru_cache(maxsize=32)
def future_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """True where query i may not see key j (j > i + t_k - t_q: the queries are the last
    t_q positions); cached per shape: callers only read it."""
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


# -- normalisers: masked scores (-inf where a key is hidden) -> weights ---------------
# Each takes the scores (B, H, T_q, T_k) and the attention module (for its parameters:
# `clip_alpha`, `sink_logit`, `sigmoid_bias`); masked entries get weight exactly 0.

def softmax_weights(scores: torch.Tensor, module=None) -> torch.Tensor:
    """softmax(S) over the visible keys."""
    return torch.softmax(scores, dim=-1)


def clipped_softmax(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bondarenko et al. 2023: clip((zeta - gamma) softmax(x) + gamma, 0, 1), zeta=1, gamma=-alpha/T."""
    gamma = -alpha / scores.shape[-1]
    return torch.clamp((1.0 - gamma) * torch.softmax(scores, dim=-1) + gamma, 0.0, 1.0)


def clipped_weights(scores: torch.Tensor, module) -> torch.Tensor:
    return clipped_softmax(scores, module.clip_alpha)


SOFTPICK_EPS = 1e-8


def softpick(scores: torch.Tensor, eps: float = SOFTPICK_EPS) -> torch.Tensor:
    """Zuhri et al. 2025: ReLU(e^x - 1) / (sum_j |e^x_j - 1| + eps), masked keys excluded.

    Computed as in their released `naive_softpick_attn.py`: numerator and sum are both
    multiplied by e^-m (m the row max), i.e. ReLU(e^(x-m) - e^-m) / (sum |e^(x-m) - e^-m|
    + eps); eps is added after the shift, as there (it only matters when every visible
    score is exactly 0)."""
    m = scores.amax(dim=-1, keepdim=True)
    shift = torch.exp(-m)
    centred = torch.exp(scores - m) - shift
    magnitude = torch.where(torch.isfinite(scores), centred.abs(), torch.zeros_like(centred))
    return F.relu(centred) / (magnitude.sum(dim=-1, keepdim=True) + eps)


def softpick_weights(scores: torch.Tensor, module=None) -> torch.Tensor:
    return softpick(scores)


def sigmoid_weights(scores: torch.Tensor, module) -> torch.Tensor:
    """Ramapuram et al. 2024: sigmoid(S + b) with b = -log(n), no normalisation across keys.
    n is the model's context length (`max_position_embeddings`), fixed so that a token's
    weights do not depend on how long the evaluated window is; hidden keys (-inf) get 0."""
    return torch.sigmoid(scores + module.sigmoid_bias)


def sink_logit_weights(scores: torch.Tensor, module) -> torch.Tensor:
    """Softmax with one learnable logit s_h per head in the denominator only:
    P_ij = exp(S_ij) / (exp(s_h) + sum_j exp(S_ij)); the row sums to less than 1, so a head
    can put mass nowhere.  Computed as the softmax over [S, s_h] without its last column."""
    sink = module.sink_logit.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


NORMALISERS: dict[str, Callable] = {
    "softmax": softmax_weights,
    "clipped": clipped_weights,
    "softpick": softpick_weights,
    "sigmoid": sigmoid_weights,
    "sink_logit": sink_logit_weights,
}


@dataclass(frozen=True)
class ArmParameter:
    """A learnable tensor a normaliser reads from the attention module (`module.<name>`;
    the name is its state-dict name too).  `shape(config)` from the model's config; `init`
    its value when a model is created; `neutral` the value at which the arm computes plain
    softmax to float32 rounding, where a retrofit into a trained model starts.  `adam_eps`:
    the Adam epsilon a fine-tune gives it (a sink logit's gradient scales with exp(s), about
    1e-15 at the neutral value, so with the default 1e-8 its update would vanish)."""

    name: str
    shape: Callable
    init: float
    neutral: float
    adam_eps: float = 1e-8

    def create(self, config, value: float, device=None, dtype=None) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.full(self.shape(config), value, device=device, dtype=dtype))


def per_query_head(config) -> tuple[int, ...]:
    return (config.num_attention_heads,)


# normaliser -> the parameters it reads.  sink_logit: 0 at init is "off-by-one"
# (exp(0) = 1 in the denominator); -30 is exp(-30) = 9e-14 of a row whose largest score is
# 0 (a finite logit cannot be an exact identity; within float32 rounding, still trainable).
NORMALISER_PARAMETERS: dict[str, tuple[ArmParameter, ...]] = {
    "sink_logit": (ArmParameter("sink_logit", per_query_head, init=0.0, neutral=-30.0, adam_eps=1e-30),),
}


@dataclass(frozen=True)
class AttentionArm:
    name: str
    # key of NORMALISERS
    normaliser: str
    # Where the gate's input comes from: None (no gate), "value" (the full value
    # projection V), "input_head" (the head's slice of the normed input, IGA) or "input"
    # (the whole normed input).
    gate_source: str | None
    # "value": the gate scales V_j before the weighted sum; "output": it scales O_i.
    gate_position: str | None
    formula: str
    description: str
    # sigmoid of the gate bias at init (None: ungated)
    gate_init: float | None = None

    @property
    def normalise(self) -> Callable:
        return NORMALISERS[self.normaliser]

    @property
    def parameters(self) -> tuple[ArmParameter, ...]:
        """The learnable tensors its normaliser reads (the gate is a module of its own)."""
        return NORMALISER_PARAMETERS.get(self.normaliser, ())


GATE_SOURCES = (None, "value", "input_head", "input")
GATE_POSITIONS = (None, "value", "output")


def capped(normalise: Callable, cap: float, scores: torch.Tensor, module=None) -> torch.Tensor:
    """normalise(c tanh(S / c)) on the visible scores; hidden ones stay -inf (transformers
    caps before adding its mask: the same weights)."""
    return normalise(torch.where(torch.isinf(scores), scores, torch.tanh(scores / cap) * cap), module)


def _arms(*arms: AttentionArm) -> dict[str, AttentionArm]:
    unknown = set(NORMALISER_PARAMETERS) - set(NORMALISERS)
    if unknown:
        raise ValueError(f"parameters declared for unknown normalisers: {sorted(unknown)}")
    for arm in arms:
        if arm.normaliser not in NORMALISERS:
            raise ValueError(f"arm {arm.name}: unknown normaliser {arm.normaliser!r}")
        if arm.gate_source not in GATE_SOURCES or arm.gate_position not in GATE_POSITIONS \
                or (arm.gate_source is None) != (arm.gate_position is None) \
                or (arm.gate_source is None) != (arm.gate_init is None):
            raise ValueError(f"arm {arm.name}: gate source, position and init must all be set or all None")
    return {arm.name: arm for arm in arms}


ATTENTION_ARMS: dict[str, AttentionArm] = _arms(
    AttentionArm("softmax", "softmax", None, None, "O = softmax(QK^T/sqrt(d)) V",
                 "vanilla softmax attention"),
    AttentionArm("vga", "softmax", "value", "value", "O = softmax(QK^T/sqrt(d)) (sigmoid(V W_g) * V)",
                 "Value-State Gated Attention, key side (Eq. 6): each token gates its own value", 0.5),
    AttentionArm("vga_out", "softmax", "value", "output", "O_i = sigmoid(V_i W_g) * (softmax(QK^T/sqrt(d)) V)_i",
                 "VGA, output side (appendix B): the query token's value-gate scales its output", 0.5),
    # Bondarenko et al. found pi_init = 0.25 best for IGA on OPT-125m.
    AttentionArm("iga", "softmax", "input_head", "output", "O_i,h = sigmoid(x_i,h w_h + b_h) * (softmax(QK^T) V)_i,h",
                 "Bondarenko gated attention: per-head Linear(d_head->1) gate on the head's slice of the normed input",
                 0.25),
    AttentionArm("qwen_g1", "softmax", "input", "output", "O_i = sigmoid(X_i W) * (softmax(QK^T/sqrt(d)) V)_i",
                 "Qiu et al. G1: gate from the whole normed input on the SDPA output", 0.5),
    AttentionArm("vga_x", "softmax", "input", "value", "O = softmax(QK^T/sqrt(d)) (sigmoid(X W) * V)",
                 "key-side gate from the normed input (Qiu et al. G2): vga with the gate's input swapped", 0.5),
    AttentionArm("clipped", "clipped", None, None, "O = clip((1 - gamma) softmax(QK^T/sqrt(d)) + gamma, 0, 1) V",
                 "Bondarenko clipped softmax, zeta=1, gamma=-alpha/T"),
    AttentionArm("softpick", "softpick", None, None, "O = ReLU(e^S - 1) / (sum_j |e^S_j - 1| + eps) V",
                 "softpick (Zuhri et al. 2025): rectified, not summing to one; eps 1e-8 after the max shift"),
    AttentionArm("sigmoid", "sigmoid", None, None, "O = sigmoid(QK^T/sqrt(d) - log n) V",
                 "sigmoid attention (Ramapuram et al. 2024), b = -log(n), n the context length"),
    AttentionArm("sink_logit", "sink_logit", None, None, "O = exp(S) / (exp(s_h) + sum_j exp(S_j)) V",
                 "softmax with a learnable per-head sink logit in the denominator (off-by-one / learned sink)"),
)
