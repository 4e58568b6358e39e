"""The one attention composition: every arm, every caller, every kernel.

    scores S = Q K^T * scaling                      (B, H, T_q, T_k)
    -> soft-cap c tanh(S / c) (where the model caps) and the masks (causal, padding,
       sliding window: hidden keys at -inf)
    -> the arm's normaliser P = normalise(S)        (softmax, sigmoid, sink logit, ...)
    -> P V, with the arm's gate g scaling V_j (value position) or O_i (output position)

`compose()` is that pipeline; its callers are adapters that only say what they hold:
the qbench model's attention (`QBenchAttention.forward`), transformers' attention
interface (`qbench.modeling.hooks.hf_attention`, which turns every interface argument
into a `Call` here, `interface_call`, or refuses it) and the arms retrofitted into stock
Llama modules (their gate arrives as a `Gate`).  Quantizers and probes see the scores, P
and P V through the module's hooks (qbench.modeling.hooks.AttentionHooks); a KV cache
quantizer hands the keys and values as the cache holds them; the low-precision kernel
(qbench.quant.lowbit_attention) substitutes its 8-bit value, gate and P V blocks.

Shapes: q (B, H, T_q, D); k, v (B, H_kv, T_k, D) per KV head (grouped-query attention
repeats them here, after the cache and the value-reading gate saw them); the queries are
the last T_q positions; the result is the per-head context (B, H, T_q, D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qbench.modeling.attention import AttentionArm, capped, first_column_sdpa, future_mask


@dataclass(frozen=True)
class Call:
    """One call's settings.  `scaling` None: divide by sqrt(D) (the qbench model's and
    SDPA's default, kept as a division: multiplying by 1/sqrt(D) rounds differently);
    `hidden` (B or 1, 1, T_q, T_k) True where a key is hidden, None = causal;
    `float_weights`: normalise in float32 and cast back (transformers' eager attention)."""

    scaling: float | None = None
    softcap: float | None = None
    hidden: torch.Tensor | None = None
    float_weights: bool = False

    @property
    def plain_causal(self) -> bool:
        return self.scaling is None and self.softcap is None and self.hidden is None


CAUSAL = Call()


@dataclass(frozen=True)
class Gate:
    """A module's gate for one call; `gate_values` computes scale * sigmoid(projection(Z)).
    Z is the value projection (B, T_k, H_kv * D) for a value-reading gate (as the cache or
    the kernel holds it), `x` (the normed attention input, (B, T, d)) for an input-reading
    one, x split into heads for `input_head`.  `projection(Z)`: logits (B, T, heads * per),
    or (B, H, T, per) for `input_head`.  `float_sigmoid`: the sigmoid in float32, cast back
    to Z's dtype (the retrofit, trained under bf16 autocast)."""

    projection: Callable
    layer: int
    x: torch.Tensor | None = None
    scale: float = 1.0
    float_sigmoid: bool = False


def notify_gate(hooks, layer: int, gate: torch.Tensor) -> None:
    if hooks is not None and hasattr(hooks, "gate"):
        hooks.gate(layer, gate)


def gate_values(arm: AttentionArm, gate: Gate, values: torch.Tensor | None, heads: int, t_q: int | None = None,
                hooks=None, notify: bool = True) -> torch.Tensor:
    """The gate (B, heads, T, 1 | D): one per gated head (the KV heads at the value
    position, the query heads at the output position) per token; at the output position
    from values, the query tokens' own (the last `t_q`).  `values` (B, T_k, H_kv * D)."""
    if arm.gate_source == "value":
        z = values
    elif arm.gate_source == "input":
        z = gate.x
    else:  # input_head: the head's slice of x, (B, H, T, d / H)
        b, t, _ = gate.x.shape
        z = gate.x.view(b, t, heads, -1).transpose(1, 2)
    logits = gate.projection(z)
    if arm.gate_source != "input_head":
        b, t, _ = logits.shape
        logits = logits.view(b, t, heads, -1).transpose(1, 2)  # (B, heads, T, per)
    g = torch.sigmoid(logits.float()).to(z.dtype) if gate.float_sigmoid else torch.sigmoid(logits)
    if gate.scale != 1.0:
        g = gate.scale * g
    if arm.gate_position == "output" and arm.gate_source == "value" and t_q is not None:
        g = g[..., -t_q:, :]
    if notify:
        notify_gate(hooks, gate.layer, g)
    return g


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # (B, H_kv, T, D) -> (B, H_kv * groups, T, D): grouped-query attention shares K and V.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _flat(v: torch.Tensor) -> torch.Tensor:
    b, h, t, d = v.shape  # (B, H_kv, T, D) -> (B, T, H_kv * D), the value projection's layout
    return v.transpose(1, 2).reshape(b, t, h * d)


def _gate(arm, gate, v, q, hooks, notify=True):
    """The arm's gate from `gate` (a Gate, or a gate tensor computed by the caller)."""
    if arm.gate_source is None:
        return None
    if isinstance(gate, torch.Tensor):
        return gate
    heads = v.shape[1] if arm.gate_position == "value" else q.shape[1]
    return gate_values(arm, gate, _flat(v) if arm.gate_source == "value" else None, heads, q.shape[-2], hooks, notify)


def compose(arm: AttentionArm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: Call = CAUSAL,
            gate=None, module=None, hooks=None, kernel=None, kv=None) -> torch.Tensor:
    """The arm's attention context (B, H, T_q, D); see the module docstring.  `gate`: a
    `Gate` (or, without a KV cache window, the gate tensor itself); `module` holds the
    normaliser's parameters; `kv` a KV cache quantizer; `kernel` the low-precision kernel."""
    normalise = arm.normalise if call.softcap is None else _capped(arm.normalise, call.softcap)
    if kv is not None:  # keys and values as the cache holds them (per KV head)
        k_q, v_q = kv.quantize(k, v)
        if kv.exact_recent:
            if kernel is not None:
                raise NotImplementedError("a KV cache with an exact recent window does not compose with the "
                                          "low-precision attention kernel; use a window of 0")
            return _windowed(arm, normalise, q, (k, v), (k_q, v_q), kv.exact_recent, gate, call, module, hooks)
        k, v = k_q, v_q
    if kernel is not None:
        return _lowbit(kernel, arm, normalise, q, k, v, gate, call, module, hooks)
    groups = q.shape[1] // k.shape[1]
    g = _gate(arm, gate, v, q, hooks)
    if arm.gate_position == "value":
        v = g * v
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    context = _weighted_sum(normalise, q, k, v, call, module, hooks,
                            fused_softmax=arm.normaliser == "softmax" and call.plain_causal)
    return g * context if arm.gate_position == "output" else context


def _capped(normalise: Callable, cap: float) -> Callable:
    return lambda scores, module=None: capped(normalise, cap, scores, module)


def _weighted_sum(normalise, q, k, v, call: Call, module, hooks, fused_softmax: bool):
    """P V.  `fused_softmax` (plain causal softmax): with no hooks the fused SDPA runs, and
    an observer that needs only P[..., 0] (`hooks.first_column_only`, the sink probes) gets
    it from the fused kernel too."""
    if fused_softmax and hooks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if fused_softmax and getattr(hooks, "first_column_only", False):
        out, first = first_column_sdpa(q, k, v)
        hooks.first_column(first)
        return out
    scores = q @ k.transpose(-1, -2)  # (B, H, T_q, T_k)
    scores = scores / math.sqrt(q.shape[-1]) if call.scaling is None else scores * call.scaling
    hidden = future_mask(q.shape[-2], k.shape[-2], q.device) if call.hidden is None else call.hidden
    return hooked_context(normalise, scores.masked_fill(hidden, float("-inf")), v, module, hooks,
                          call.float_weights)


def hooked_context(normalise: Callable, scores: torch.Tensor, v: torch.Tensor, module=None, hooks=None,
                   float_weights: bool = True):
    """P V with P = normalise(masked scores), the hooks seeing (and replacing) the scores,
    P (observing P[..., 0]) and the context.  scores (B, H, T_q, T_k), -inf where hidden;
    v (B, H, T_k, D).  `float_weights`: normalise in float32 (as transformers' eager)."""
    if hooks is not None:
        scores = hooks.scores(scores)
    probs = normalise(scores.float(), module).to(v.dtype) if float_weights else normalise(scores, module)
    if hooks is not None:
        probs = hooks.probs(probs)
        if hasattr(hooks, "first_column"):
            hooks.first_column(probs[..., 0])
    context = probs @ v
    return hooks.context(context) if hooks is not None else context


def _windowed(arm, normalise, q, exact: tuple, quantized: tuple, window: int, gate, call: Call, module, hooks):
    """Attention over a quantized KV cache whose most recent `window` tokens are exact:
    query i reads key/value j exact while i - j < window, dequantized after (KIVI's
    residual).  `exact` and `quantized` are (k, v) each, (B, H_kv, T_k, D); the gate is
    computed from each (observers see the exact one).  The scores take each key exact or
    quantized per query; P V is P V_q + (P * recent)(V - V_q), the same weighted sum split
    by where each value lives."""
    (k, v), (k_q, v_q) = exact, quantized
    if isinstance(gate, torch.Tensor):
        raise ValueError("a KV cache window needs the gate of the exact and of the cached values: pass a Gate")
    g, g_q = _gate(arm, gate, v, q, hooks), _gate(arm, gate, v_q, q, hooks, notify=False)
    if arm.gate_position == "value":
        v, v_q = g * v, g_q * v_q
    groups = q.shape[1] // k.shape[1]
    k, v, k_q, v_q = (repeat_kv(x, groups) for x in (k, v, k_q, v_q))
    t_q, t_k = q.shape[-2], k.shape[-2]
    rows = torch.arange(t_q, device=q.device)[:, None] + (t_k - t_q)
    recent = (rows - torch.arange(t_k, device=q.device)[None, :]) < window  # (T_q, T_k)
    scaling = call.scaling if call.scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.where(recent, q @ k.transpose(-1, -2), q @ k_q.transpose(-1, -2)) * scaling  # (B, H, T_q, T_k)
    hidden = future_mask(t_q, t_k, q.device) if call.hidden is None else call.hidden
    scores = scores.masked_fill(hidden, float("-inf"))
    if hooks is not None:
        scores = hooks.scores(scores)
    probs = normalise(scores.float(), module).to(q.dtype)
    if hooks is not None:
        probs = hooks.probs(probs)
        if hasattr(hooks, "first_column"):
            hooks.first_column(probs[..., 0])
    context = probs @ v_q + (probs * recent) @ (v - v_q)
    if hooks is not None:
        context = hooks.context(context)
    # the query's own value lies in its window: its exact gate
    return g * context if arm.gate_position == "output" else context


def _lowbit(kernel, arm, normalise, q, k, v, gate, call: Call, module, hooks):
    """The kernel's blocks in the same composition: V to 8-bit codes (per KV head: the
    codes of a repeated head are the same), a value-reading gate fed the dequantized V and
    itself quantized, g V re-quantized at the value position, the kernel's P V, g O."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    reads_values = arm.gate_source == "value"
    v_codes, v_scale, *v_deq = kernel.quantize_values(v, dequantized=reads_values)
    g = None
    if arm.gate_source is not None:
        g = _gate(arm, gate, v_deq[0] if reads_values else v, q, hooks)  # a gate that reads values sees the quantized ones
        if arm.gate_position == "value":
            v_codes, v_scale = kernel.gated_values(g, v_codes, v_scale)  # g_j V_j (g quantized), re-quantized
        else:
            g = kernel.quantize_gate(g)
    groups = q.shape[1] // k.shape[1]
    k, v_codes, v_scale = repeat_kv(k, groups), repeat_kv(v_codes, groups), repeat_kv(v_scale, groups)
    scaling = call.scaling if call.scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    out = kernel.weighted_sum(q, k, v_codes, v_scale, normalise, module, scaling, call.hidden, hooks)
    if arm.gate_position == "output":
        out = g * out
    return out.to(dtype)


# -- transformers' attention interface: every argument honoured, applied before, or refused --
# (tests/test_attention_interface.py enumerates what the installed transformers passes and
# fails on a name missing here)
HONOURED = {
    "query": "Q (B, H, T_q, D)",
    "key": "K (B, H_kv, T_k, D), repeated over each KV group after the cache saw it",
    "value": "V (B, H_kv, T_k, D), as K; a value-reading gate reads it before the repeat",
    "attention_mask": "boolean or additive (dtype minimum) mask -> hidden keys at -inf (causal, padding, packed)",
    "scaling": "multiplies Q K^T; None: D^-0.5",
    "softcap": "c tanh(S / c) on the visible scores before the normaliser (Gemma2)",
    "sliding_window": "query i sees key j only while i - j < window",
    "is_causal": "with no mask: False = every key visible, True/None = causal (the module's is_causal); "
                 "a mask, when given, decides (as transformers' SDPA)",
    "dropout": "0 (eval mode) honoured; a positive rate is refused",
    "output_attentions": "False honoured (no weights are returned); True refused",
    "deterministic": "qbench's attention is deterministic at any value",
}
APPLIED_BEFORE = {
    "position_ids": "rotary positions were applied to Q and K by the model; packed sequences arrive as the mask "
                    "(transformers builds it from position_ids for non-flash implementations)",
    "position_embeddings": "rotary (cos, sin), applied to Q and K by the model before the call",
    "cache_position": "cache bookkeeping: K and V arrive as the cache holds them",
    "past_key_values": "cache bookkeeping: K and V arrive as the cache holds them",
    "use_cache": "cache bookkeeping",
    "layer_idx": "cache bookkeeping",
    "output_hidden_states": "a model output, not attention",
    "output_router_logits": "a model output, not attention",
    "num_items_in_batch": "the loss's normaliser, not attention",
}
REFUSED = {
    "s_aux": "learned attention sinks (gpt-oss)",
    "sinks": "learned attention sinks",
    "position_bias": "an additive relative-position bias (T5-like)",
    "head_mask": "a per-head mask of the weights",
    "cu_seq_lens_q": "flash-attention varlen packing (no mask)",
    "cu_seq_lens_k": "flash-attention varlen packing (no mask)",
    "max_length_q": "flash-attention varlen packing (no mask)",
    "max_length_k": "flash-attention varlen packing (no mask)",
    "seq_idx": "packed sequence indices (no mask)",
    "indices": "flash-attention unpadding indices",
    "block_indices": "block-sparse attention",
}


def hidden_keys(attention_mask: torch.Tensor | None, t_q: int, t_k: int, device, causal: bool = True) -> torch.Tensor:
    """(B or 1, 1, T_q, T_k) True where a key is hidden, from an HF mask (boolean, or
    additive with the dtype's minimum) or, with none, the causal mask (or nothing hidden)."""
    if attention_mask is None:
        if not causal:
            return torch.zeros(1, 1, t_q, t_k, dtype=torch.bool, device=device)
        return future_mask(t_q, t_k, device)[None, None]
    if attention_mask.dtype == torch.bool:
        hidden = ~attention_mask
    else:
        hidden = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    return hidden if hidden.dim() == 4 else hidden[:, None]


def _refuse(name: str, value, why: str) -> None:
    raise NotImplementedError(f"attention argument {name}={value!r:.40}: {why} is not computed by qbench's "
                              "attention; this model's attention cannot be routed through it")


def interface_call(module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                   scaling: float | None, dropout: float, kwargs: dict) -> Call:
    """The `Call` for the arguments transformers' attention interface passed (see HONOURED,
    APPLIED_BEFORE, REFUSED); NotImplementedError for a refused or unknown one.  Keyword
    arguments named qbench_* are a retrofit's own (the gate's input)."""
    if dropout:
        _refuse("dropout", dropout, "attention dropout (a model in training mode: call model.eval())")
    if kwargs.get("output_attentions"):
        _refuse("output_attentions", True, "returning the weights (observe them through qbench.modeling.hooks)")
    for name, why in REFUSED.items():
        if kwargs.get(name) is not None:
            _refuse(name, kwargs[name], why)
    unknown = sorted(k for k, v in kwargs.items() if v is not None and not k.startswith("qbench_")
                     and k not in HONOURED and k not in APPLIED_BEFORE)
    if unknown:
        raise NotImplementedError(f"transformers passed attention argument(s) {unknown} that qbench's attention "
                                  "does not know; it refuses rather than compute another model")
    is_causal = kwargs.get("is_causal")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t_q, t_k = query.shape[-2], key.shape[-2]
    hidden = hidden_keys(attention_mask, t_q, t_k, query.device, causal)
    window = kwargs.get("sliding_window")
    if window is not None:  # as transformers' sliding-window mask
        rows = torch.arange(t_q, device=query.device)[:, None] + (t_k - t_q)  # the queries' positions
        hidden = hidden | ((rows - torch.arange(t_k, device=query.device)[None, :]) >= window)
    return Call(scaling=scaling if scaling is not None else query.shape[-1] ** -0.5, softcap=kwargs.get("softcap"),
                hidden=hidden, float_weights=True)
