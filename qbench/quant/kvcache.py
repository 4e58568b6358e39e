"""KV-cache quantization, simulated: every key and value is quantized once as it enters the
cache, and attention reads the dequantized values.

A KV scheme (`KVCacheSpec`, stored as `options["kv_cache"]` of a `Scheme`, so it composes
with any weight/activation scheme and leaves the other schemes' hashes alone) names
  - `bits` (8, 4, 2): asymmetric min-max codes, x_hat = lo + s clamp(round((x - lo) / s),
    0, 2^b - 1), s = (hi - lo) / (2^b - 1), lo/hi the group's min and max (KIVI's and
    optimum-quanto's MaxOptimizer formula; scale and minimum stored in fp16);
  - the axes: `token` (one group per token over `group_size` channels of the head, or
    the whole head) or `channel` (keys only: one group per channel over `group_size`
    consecutive tokens, KIVI's keys, whose outlier channels are fixed across tokens);
  - `residual`: the most recent R tokens stay exact (KIVI's full-precision window; query i
    reads key j exact while i - j < R, quantized after);
  - `sink`: the first S tokens' K and V stay exact (KVQuant / IntactKV's attention sink).
Groups of tokens start after the sink at fixed positions, so a token's quantized value
never depends on which query reads it.  Per-channel groups must fit in the residual
window (group_size <= residual): a group is quantized only once all its tokens exist, as
in KIVI, so no query ever reads a key whose scale saw a future token.

Tensors are (B, H_kv, T, D): keys and values as the cache stores them (before GQA repeats
them over query heads).  `KVCacheQuantizer` is the `qbench_kv` hook of the attention
modules (qbench.modeling.hooks).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from qbench.quant.handlers import register

AXES = ("token", "channel")
FP16_BYTES = 2  # the exact window, and each group's scale and minimum, are stored in fp16


@dataclass(frozen=True)
class KVCacheSpec:
    bits: int
    key_axis: str = "token"
    value_axis: str = "token"
    group_size: int | None = None  # None: the whole head (per token); required per channel
    residual: int = 0
    sink: int = 0

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"KV cache bits must be 2, 3, 4 or 8, got {self.bits!r}")
        if self.key_axis not in AXES or self.value_axis != "token":
            raise ValueError(f"KV axes: keys 'token' or 'channel', values 'token'; got keys {self.key_axis!r}, "
                             f"values {self.value_axis!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"KV group_size must be >= 1 or None, got {self.group_size!r}")
        if self.residual < 0 or self.sink < 0:
            raise ValueError(f"KV residual and sink must be >= 0, got {self.residual}, {self.sink}")
        if self.key_axis == "channel" and (self.group_size is None or self.group_size > self.residual):
            raise ValueError(f"per-channel keys need group_size <= residual (a group is quantized once all its "
                             f"tokens exist); got group_size {self.group_size}, residual {self.residual}")

    @classmethod
    def from_options(cls, options: dict) -> "KVCacheSpec":
        return cls(**options)

    def to_options(self) -> dict:
        return asdict(self)

    def formula(self) -> str:
        group = f"groups of {self.group_size}" if self.group_size else "whole head"
        keys = (f"K per channel over {self.group_size} tokens" if self.key_axis == "channel"
                else f"K per token ({group})")
        parts = [f"KV{self.bits}: x_hat = lo + s clamp(round((x - lo)/s), 0, {2 ** self.bits - 1}), "
                 f"s = (hi - lo)/{2 ** self.bits - 1}; {keys}, V per token ({group})"]
        if self.sink:
            parts.append(f"first {self.sink} token{'s' * (self.sink > 1)} exact")
        if self.residual:
            parts.append(f"last {self.residual} tokens exact")
        return "; ".join(parts)

    def bytes_per_token(self, head_dim: int, context: int | None = None) -> float:
        """K + V bytes per token per KV head (scales and minima included); with `context`,
        averaged over a cache of that many tokens, whose first `sink` and last `residual`
        tokens are fp16."""
        def overhead(axis):  # fp16 scale + minimum per group, per token
            if axis == "channel":
                return head_dim * 2 * FP16_BYTES / self.group_size
            return math.ceil(head_dim / (self.group_size or head_dim)) * 2 * FP16_BYTES

        quantized = 2 * head_dim * self.bits / 8 + overhead(self.key_axis) + overhead(self.value_axis)
        if context is None:
            return quantized
        exact = min(context, self.sink + self.residual)
        return (exact * 2 * head_dim * FP16_BYTES + (context - exact) * quantized) / context


    def quantized_read_fraction(self, queries: range) -> float:
        """The share of the (query, key) reads of these query positions (0-based, causal)
        that read a quantized entry: query i reads key j quantized when j >= sink and
        i - j >= residual, so i - residual - sink + 1 of its i + 1 reads."""
        reads = sum(i + 1 for i in queries)
        quantized = sum(max(0, i - self.residual - self.sink + 1) for i in queries)
        return quantized / reads if reads else 0.0


def fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max over `dim` (one group per slice); a constant group is exact."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((x - lo) / safe), 0, levels)
    return codes * scale + lo


def quantize_per_token(x: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """(..., T, D): each token's channels in groups of `group_size` (None: all D)."""
    d = x.shape[-1]
    g = group_size or d
    if d % g:
        raise ValueError(f"KV group size {g} does not divide the head width {d}: pick a divisor of {d}")
    return fake_quantize(x.reshape(*x.shape[:-1], d // g, g), bits, dim=-1).reshape(x.shape)


def quantize_per_channel(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """(..., T, D): each channel over consecutive groups of `group_size` tokens from the
    first; a last, partial group is quantized over the tokens it has (it lies inside the
    residual window of every query that can see it, so no query reads it quantized)."""
    t = x.shape[-2]
    full = t - t % group_size
    out = torch.empty_like(x)
    if full:
        head = x[..., :full, :].reshape(*x.shape[:-2], full // group_size, group_size, x.shape[-1])
        out[..., :full, :] = fake_quantize(head, bits, dim=-2).reshape(*x.shape[:-2], full, x.shape[-1])
    if full < t:
        out[..., full:, :] = fake_quantize(x[..., full:, :], bits, dim=-2)
    return out


class KVCacheQuantizer:
    """The `qbench_kv` hook: `quantize(k, v)` gives the keys and values as the cache holds
    them (the first `sink` tokens exact, the rest quantized); `exact_recent` tells the
    attention how many of the most recent tokens each query reads exact instead."""

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        self.exact_recent = spec.residual

    def _one(self, x: torch.Tensor, axis: str) -> torch.Tensor:
        s = self.spec
        body = x[..., s.sink:, :].float()
        if axis == "channel":
            body = quantize_per_channel(body, s.bits, s.group_size)
        else:
            body = quantize_per_token(body, s.bits, s.group_size)
        return torch.cat([x[..., :s.sink, :], body.to(x.dtype)], dim=-2)

    def quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._one(k, self.spec.key_axis), self._one(v, self.spec.value_axis)

    def __repr__(self) -> str:
        return f"KVCacheQuantizer({self.spec.formula()})"


def install_kv_cache(model: torch.nn.Module, spec: KVCacheSpec) -> dict:
    """Attach the quantizer to every attention module (qbench models directly, stock HF
    models through the attention registry); returns facts for the record."""
    from qbench.modeling.hooks import attention_layers

    layers = attention_layers(model)
    quantizer = KVCacheQuantizer(spec)
    for _, module in layers:
        module.qbench_kv = quantizer
    config = getattr(model, "config", None)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads if hasattr(config, "hidden_size") else None)
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "n_head", None)
    facts = {"kv_cache_layers": len(layers), "kv_cache_formula": spec.formula()}
    if head_dim and kv_heads:
        per_head = spec.bytes_per_token(head_dim)
        facts["kv_cache_bytes_per_token"] = round(per_head * kv_heads * len(layers), 2)
        facts["kv_cache_fp16_bytes_per_token"] = 2 * head_dim * FP16_BYTES * kv_heads * len(layers)
    return facts


def _check(scheme) -> None:
    try:
        KVCacheSpec.from_options(scheme.options["kv_cache"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"scheme {scheme.name!r}: kv_cache {scheme.options['kv_cache']!r}: {err}") from None


@register("addon", "kv_cache", check=_check, devices=("cpu", "cuda"), requires=("attention",))
def apply_kv_cache(model: torch.nn.Module, scheme, calibration=None) -> dict:
    """Keys and values as they enter the cache, after any weight/activation scheme."""
    return install_kv_cache(model, KVCacheSpec.from_options(scheme.options["kv_cache"]))
