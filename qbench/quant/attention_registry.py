"""Quantized / instrumented attention for stock Hugging Face models (Llama, GPT-2, ...)
through transformers' attention-function registry, never by patching their forward.

`install_attention(model)` registers the "qbench" implementation and switches the model
to it; each attention module then runs `qbench_attention`, which computes the softmax arm
explicitly and lets whatever is attached to the module as `qbench_sites` (quantizers,
probes) see the scores, the probabilities and the context.  The same function runs the
low-precision kernel when one is attached as `qbench_kernel`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

IMPLEMENTATION = "qbench"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # (B, H_kv, T, D) -> (B, H_kv * groups, T, D): grouped-query attention shares K and V.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def qbench_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)  # (B, H, T, D)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    kernel = getattr(module, "qbench_kernel", None)
    if kernel is not None:
        context = kernel(query, key, value, attention_mask=attention_mask, scaling=scaling)
        return context.transpose(1, 2).contiguous(), None
    sites = getattr(module, "qbench_sites", None)
    scores = (query @ key.transpose(-1, -2)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:  # additive masks use the dtype's minimum; make them -inf so quantizers skip them
            scores = scores.masked_fill(attention_mask <= torch.finfo(attention_mask.dtype).min / 2, float("-inf"))
    else:
        t_q, t_k = scores.shape[-2:]
        causal = torch.ones(t_q, t_k, dtype=torch.bool, device=scores.device).tril(t_k - t_q)
        scores = scores.masked_fill(~causal, float("-inf"))
    if sites is not None:
        scores = sites.scores(scores)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if sites is not None:
        probs = sites.probs(probs)
    context = probs @ value
    if sites is not None:
        context = sites.context(context)
    return context.transpose(1, 2).contiguous(), None  # (B, T, H, D)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, qbench_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a stock HF model: those that hold q/k/v projections."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and any(hasattr(m, n) for n in ("q_proj", "c_attn", "qkv_proj"))]


def install_attention(model: nn.Module) -> list[nn.Module]:
    modules = attention_modules(model)
    if not modules:
        raise NotImplementedError(f"{type(model).__name__}: no attention modules found for the qbench attention")
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    return modules


def install_quantized_attention(model: nn.Module, make_quantizer) -> int:
    """Attach score / probability / context quantizers to every attention module."""
    from qbench.quant.static import AttentionQuantSites

    modules = install_attention(model)
    for module in modules:
        module.qbench_sites = AttentionQuantSites(make_quantizer)
    return len(modules)
