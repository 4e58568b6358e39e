"""The one attention hook protocol: quantizers, the low-precision kernel and the probes all
attach to attention modules the same way, on qbench models and on stock Hugging Face models
(which modules those are: qbench.modeling.families).  Observers (the probes) chain after
the hooks already there through `ObserverHooks` and `observing`.

Every attention module may carry three attributes:
  `qbench_hooks`  an `AttentionHooks` object that sees (and may replace) the scores, the
                  weights P and the context P V, and observes P[..., 0] and the gates;
  `qbench_kernel` an `AttentionKernel` that computes the attention itself (the
                  low-precision kernel); it reports P[..., 0] and gates to the hooks;
  `qbench_kv`     a KV cache quantizer (qbench.quant.kvcache): `quantize(k, v)` gives the
                  keys and values (B, H_kv, T, D) as the cache holds them, and
                  `exact_recent` the window of recent tokens each query reads exact.
On qbench models `QBenchAttention` reads them directly; on stock HF models (Llama, GPT-2,
...) transformers' attention-function registry routes attention through
`hf_attention` (an implementation named "qbench"), never by patching their forward.  A
stock module into which an arm was retrofitted (qbench.modeling.llama_arms) also carries
`qbench_arm_attention`, the function that computes its arm; `hf_attention` hands it the
(KV-quantized) query, keys and values with the module's hooks and kernel.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol

import torch
import torch.nn as nn

from qbench.modeling.families import UnsupportedModel, attention_modules, family_of

IMPLEMENTATION = "qbench"


class AttentionHooks(Protocol):
    """Each method returns its tensor (a quantizer returns it quantized, an observer as is).
    `first_column` and `gate` are optional observers: every path that computes P calls
    `first_column(P[..., 0])` (after `probs`), every gated arm calls `gate`.
    `first_column_only`: the hooks need nothing but P[..., 0] (and gates) and replace
    nothing, so a fused path may hand over that column alone instead of materialising P."""

    first_column_only: bool

    def scores(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, H, T_q, T_k), -inf where hidden
    def probs(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, H, T_q, T_k)
    def context(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, H, T_q, D)
    def first_column(self, x: torch.Tensor) -> None: ...  # (B, H, T_q): P[..., 0] as computed
    def gate(self, layer: int, g: torch.Tensor) -> None: ...  # (B, H, T, 1 | D)


class AttentionKernel(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, arm, module, gate_fn,
               scaling: float, hidden: torch.Tensor | None, hooks) -> torch.Tensor: ...


def notify_gate(hooks, layer: int, gate: torch.Tensor) -> None:
    if hooks is not None and hasattr(hooks, "gate"):
        hooks.gate(layer, gate)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # (B, H_kv, T, D) -> (B, H_kv * groups, T, D): grouped-query attention shares K and V.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def hidden_keys(attention_mask: torch.Tensor | None, t_q: int, t_k: int, device) -> torch.Tensor:
    """(B or 1, 1, T_q, T_k) True where a key is hidden, from an HF mask (boolean, or
    additive with the dtype's minimum) or, with none, the causal mask."""
    if attention_mask is None:
        from qbench.modeling.attention import future_mask

        return future_mask(t_q, t_k, device)[None, None]
    if attention_mask.dtype == torch.bool:
        hidden = ~attention_mask
    else:
        hidden = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    return hidden if hidden.dim() == 4 else hidden[:, None]


# arguments of transformers' attention interface that carry nothing qbench computes
# differently (positions and cache bookkeeping; the mask carries causality)
_IGNORED = {"position_ids", "cache_position", "is_causal", "output_attentions", "use_cache", "past_key_values",
            "position_embeddings", "layer_idx", "head_mask", "sliding_window"}


def interface_arguments(query, key, scaling, dropout, attention_mask, kwargs) -> tuple[float, float | None,
                                                                                     torch.Tensor]:
    """(scaling, softcap, hidden) from the arguments transformers' attention interface
    passes: every one is honoured or refused here.  `hidden` (B or 1, 1, T_q, T_k): True
    where a key is hidden, from the mask and the sliding window (query i sees key j only
    while i - j < window, as transformers' sliding-window mask)."""
    if dropout:
        raise NotImplementedError(f"attention dropout {dropout} (a model in training mode): qbench's attention "
                                  "computes the eval-mode forward; call model.eval()")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with learned sinks ({name}) is not computed by qbench's "
                                      "attention; this model's attention cannot be routed through it")
    softcap = kwargs.get("softcap")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    t_q, t_k = query.shape[-2], key.shape[-2]
    hidden = hidden_keys(attention_mask, t_q, t_k, query.device)
    window = kwargs.get("sliding_window")
    if window is not None:
        rows = torch.arange(t_q, device=query.device)[:, None] + (t_k - t_q)  # the queries' positions
        hidden = hidden | ((rows - torch.arange(t_k, device=query.device)[None, :]) >= window)
    unknown = sorted(k for k, v in kwargs.items() if v is not None and not k.startswith("qbench_")
                     and k not in _IGNORED | {"softcap", "s_aux", "sinks"})  # qbench_*: a retrofit's own
    if unknown:
        raise NotImplementedError(f"transformers passed attention argument(s) {unknown} that qbench's attention "
                                  "does not know; it refuses rather than compute another model")
    return scaling, softcap, hidden


def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs):
    """The softmax arm for stock HF attention modules, explicit, with the module's hooks and
    kernel (see the module docstring).  Returns (B, T, H, D) as transformers expects."""
    from dataclasses import replace

    from qbench.modeling.attention import ATTENTION_ARMS, hooked_context

    scaling, softcap, hidden = interface_arguments(query, key, scaling, dropout, attention_mask, kwargs)
    hooks = getattr(module, "qbench_hooks", None)
    kernel = getattr(module, "qbench_kernel", None)
    kv = getattr(module, "qbench_kv", None)
    arm_attention = getattr(module, "qbench_arm_attention", None)
    if arm_attention is not None:  # an arm retrofitted into the model (qbench.modeling.llama_arms)
        if softcap is not None:
            raise NotImplementedError("a retrofitted arm does not compose with soft-capped attention scores")
        if kv is not None:  # the cache as stored: per KV head; a value-reading gate sees it too
            if kv.exact_recent:
                raise NotImplementedError("a KV cache with an exact recent window is not wired into retrofitted "
                                          "arms; use a scheme without a window")
            key, value = kv.quantize(key, value)

        context = arm_attention(module, query, key, value, ~hidden, scaling, hooks, kernel, kwargs)
        return context.transpose(1, 2).contiguous(), None
    # softmax, soft-capped where the model caps: one arm for the float, windowed and kernel paths
    arm = replace(ATTENTION_ARMS["softmax"], softcap=softcap)
    groups = getattr(module, "num_key_value_groups", 1)
    if kv is not None:  # quantized per KV head, as the cache stores them (before the GQA repeat)
        key_q, value_q = kv.quantize(key, value)
        if kv.exact_recent:
            if kernel is not None:
                raise NotImplementedError("a KV cache with an exact recent window does not compose with the "
                                          "low-precision attention kernel; use a window of 0")
            from qbench.modeling.attention import attend_windowed

            exact = (_repeat_kv(key, groups), _repeat_kv(value, groups), None)
            quantized = (_repeat_kv(key_q, groups), _repeat_kv(value_q, groups), None)
            context = attend_windowed(arm, query, exact, quantized, kv.exact_recent,
                                      module=module, hooks=hooks, hidden=hidden, scaling=scaling)
            return context.transpose(1, 2).contiguous(), None
        key, value = key_q, value_q
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)  # (B, H, T, D)
    if kernel is not None:
        context = kernel.attend(query, key, value, arm=arm, module=module, gate_fn=None,
                                scaling=scaling, hidden=hidden, hooks=hooks)
        return context.transpose(1, 2).contiguous(), None
    scores = ((query @ key.transpose(-1, -2)) * scaling).masked_fill(hidden, float("-inf"))  # (B, H, T, T)
    context = hooked_context(arm.normalise, scores, value, module, hooks)
    return context.transpose(1, 2).contiguous(), None  # (B, T, H, D)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def install_attention(model: nn.Module) -> list[nn.Module]:
    """Route a stock HF model's attention through `hf_attention`; returns its modules.
    UnsupportedModel where the family's attention does not go through transformers'
    interface (routing it would silently change nothing)."""
    family = family_of(model)
    why = family.refusal("attention")
    if why is not None:
        raise UnsupportedModel(f"{type(model).__name__} ({family.name} family): {why}")
    modules = attention_modules(model)
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    return modules


def attention_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, attention module) for every attention of a qbench or stock HF model,
    each ready to take `qbench_hooks` / `qbench_kernel` (stock models are switched to the
    "qbench" implementation)."""
    modules = attention_modules(model) if family_of(model).native else install_attention(model)
    return list(enumerate(modules))


# -- observers chained after the hooks already there ------------------------------------

class ObserverHooks(nn.Module):
    """Hooks that observe and replace nothing, chained after the hooks already on a module
    (`inner`, a quantizer's, or None): each tensor passes through `inner` first, so an
    observer of a quantized model sees what it computes.  Subclasses override the
    `observe_*` methods they need.  An nn.Module because `qbench_hooks` may have held one
    (a quantizer's) before.  `first_column_only`: the observer needs nothing but P[..., 0]
    and the gates (only true with no inner hooks: those may need P itself)."""

    def __init__(self, inner=None, first_column_only: bool = False):
        super().__init__()
        self.inner = inner
        self.first_column_only = first_column_only and inner is None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner.scores(x) if self.inner is not None else x
        self.observe_scores(x)
        return x

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner.probs(x) if self.inner is not None else x
        self.observe_probs(x)
        return x

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.context(x) if self.inner is not None else x

    def first_column(self, x: torch.Tensor) -> None:
        if self.inner is not None and hasattr(self.inner, "first_column"):
            self.inner.first_column(x)
        self.observe_first_column(x)

    def gate(self, layer: int, g: torch.Tensor) -> None:
        self.observe_gate(layer, g)
        notify_gate(self.inner, layer, g)

    def observe_scores(self, x: torch.Tensor) -> None: ...  # (B, H, T_q, T_k)
    def observe_probs(self, x: torch.Tensor) -> None: ...  # (B, H, T_q, T_k)
    def observe_first_column(self, x: torch.Tensor) -> None: ...  # (B, H, T_q)
    def observe_gate(self, layer: int, g: torch.Tensor) -> None: ...  # (B, H, T, 1 | D)


@contextmanager
def observing(model: nn.Module, make_observer: Callable[[int, nn.Module, object], ObserverHooks]):
    """For the `with` block, every attention module carries `make_observer(layer index,
    module, its hooks until now)`; yields the (index, module) pairs.  Afterwards the hooks
    are restored, and a stock model's attention implementation too."""
    previous = getattr(model.config, "_attn_implementation", None)
    layers = attention_layers(model)  # switches stock HF models to the qbench implementation
    saved = [(module, getattr(module, "qbench_hooks", None)) for _, module in layers]
    for (index, module), (_, inner) in zip(layers, saved):
        module.qbench_hooks = make_observer(index, module, inner)
    try:
        yield layers
    finally:
        for module, inner in saved:
            module.qbench_hooks = inner
        if previous is not None and getattr(model.config, "_attn_implementation", None) != previous:
            model.set_attn_implementation(previous)
