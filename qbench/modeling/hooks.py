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
`qbench_arm_call`, a function (module, interface kwargs) -> (its arm, its `Gate` or
None).  Both callers are adapters around qbench.modeling.compose.compose.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol

import torch
import torch.nn as nn

from qbench.modeling.attention import ATTENTION_ARMS
from qbench.modeling.compose import compose, interface_call, notify_gate
from qbench.modeling.families import UnsupportedModel, attention_modules, family_of

IMPLEMENTATION = "qbench"
SOFTMAX = ATTENTION_ARMS["softmax"]


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
    """The blocks a kernel substitutes inside qbench.modeling.compose.compose: the values
    as it stores them (codes, scales; codes * scales is what a value-reading gate sees), the
    gate as it applies it, and P V from float q, k (B, H, T, D), `normalise` the arm's
    normaliser (soft-capped where the call caps), `hidden` None = causal."""

    def quantize_values(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def quantize_gate(self, g: torch.Tensor) -> torch.Tensor: ...
    def weighted_sum(self, q: torch.Tensor, k: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                     normalise, module, scaling: float, hidden: torch.Tensor | None, hooks) -> torch.Tensor: ...


def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs):
    """The attention function registered with transformers' interface: an adapter around
    `compose` with the module's arm (softmax unless one was retrofitted), gate, hooks,
    kernel and KV cache (see the module docstring); every interface argument is honoured or
    refused by `interface_call`.  Returns (B, T, H, D) as transformers expects."""
    call = interface_call(module, query, key, attention_mask, scaling, dropout, kwargs)
    arm_call = getattr(module, "qbench_arm_call", None)  # a retrofitted arm (qbench.modeling.llama_arms)
    arm, gate = arm_call(module, kwargs) if arm_call is not None else (SOFTMAX, None)
    context = compose(arm, query, key, value, call=call, gate=gate, module=module,
                      hooks=getattr(module, "qbench_hooks", None), kernel=getattr(module, "qbench_kernel", None),
                      kv=getattr(module, "qbench_kv", None))
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
