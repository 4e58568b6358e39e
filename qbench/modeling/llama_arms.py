"""Attention arms inside a stock Llama-family model (the retrofit: SmolLM2 with a VGA gate).

`install_arm(model, arm)` adds an arm's parameters to every attention module of a Llama
family HF model; `qbench.modeling.hooks.hf_attention` composes each module with the arm
and gate that `arm_call` (installed as `qbench_arm_call`) gives, never by patching their
forward.  What is added to each `self_attn`:

  `qbench_arm`   the `AttentionArm` (its normaliser and gate source/position)
  `qbench_gate`  a `GateLinear` (quantizers leave it in full precision, like every gate)
  and the parameters its normaliser declares (`AttentionArm.parameters`: `sink_logit`,
  one logit per query head)

The retrofit must not change the model at step 0, so the gate is
`g = 2 * sigmoid(Z W + b)` with W = 0 and b = 0: exactly 1 at init, range (0, 2); a
normaliser's parameters start at their declared `neutral` value (the sink logit at -30,
whose exp is 9e-14 of a row whose largest score is 0).  Layout under grouped-query
attention (SmolLM2: 9 query heads, 3 KV heads):

  vga      key side, gate from the layer's value projection V (B, T, H_kv * D) -> one gate
           per KV head per token: a token gates its value once, for the 3 query heads that
           share it (the gate sits where the value lives);
  vga_out  output side, gate from V_i -> one gate per query head, scaling O_i;
  qwen_g1  output side, gate from the normed layer input X_i -> one gate per query head;
  vga_x    key side, gate from X_j -> one gate per KV head;
  sink_logit  no gate, softmax with exp(s_h) in the denominator, s_h per query head.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qbench.modeling.attention import ATTENTION_ARMS, AttentionArm
from qbench.modeling.compose import Gate
from qbench.modeling.families import UnsupportedModel, attention_modules, family_of
from qbench.modeling.hooks import install_attention

GATE_SCALE = 2.0  # g = 2 sigmoid(.): exactly 1 with zero weights
RETROFIT_ARMS = ("softmax", "vga", "vga_out", "qwen_g1", "vga_x", "sink_logit")
INPUT_KWARG = "qbench_input"  # the normed layer input, handed to the attention function


def _gated_heads(module: nn.Module, arm: AttentionArm) -> int:
    heads = module.config.num_attention_heads
    return heads // module.num_key_value_groups if arm.gate_position == "value" else heads


def _gate_in_features(module: nn.Module, arm: AttentionArm) -> int:
    return module.v_proj.out_features if arm.gate_source == "value" else module.q_proj.in_features


def _pass_input(module, args, kwargs):
    """Forward pre-hook: hands the attention input X to the attention function as a kwarg
    (LlamaAttention passes its **kwargs through to the registered function)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    kwargs[INPUT_KWARG] = hidden
    return args, kwargs


def _retrofit_modules(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's attention module of a model whose family takes a retrofit
    (qbench.modeling.families: stock q/k/v/o attention, grouped-query heads)."""
    try:
        family = family_of(model)
    except UnsupportedModel as err:
        raise ValueError(f"the retrofit takes a Llama-family Hugging Face model: {err}") from err
    if not family.retrofit:
        raise ValueError(f"{type(model).__name__} ({family.name} family): the retrofit takes a Llama-family "
                         "Hugging Face model (q/k/v/o projections, grouped-query attention)")
    return attention_modules(model)


def install_arm(model: nn.Module, arm_name: str) -> list[nn.Module]:
    """Adds `arm_name`'s parameters (at their identity init) to every attention module and
    routes attention through the arm.  Returns the attention modules."""
    if arm_name not in RETROFIT_ARMS:
        raise ValueError(f"arm {arm_name!r} cannot be retrofitted; choose one of {', '.join(RETROFIT_ARMS)}")
    from qbench.modeling.model import GateLinear

    arm = ATTENTION_ARMS[arm_name]
    modules = _retrofit_modules(model)
    ref = next(model.parameters())
    for module in modules:
        module.qbench_arm = arm
        module.qbench_arm_call = arm_call  # called by hooks.hf_attention
        if arm.gate_source is not None:
            if arm.gate_source not in ("value", "input"):
                raise ValueError(f"arm {arm_name}: gate source {arm.gate_source!r} has no retrofit layout")
            gate = GateLinear(_gate_in_features(module, arm), _gated_heads(module, arm))
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            module.qbench_gate = gate.to(device=ref.device, dtype=ref.dtype)
            if arm.gate_source == "input":
                module._qbench_input_hook = module.register_forward_pre_hook(_pass_input, with_kwargs=True)
        for parameter in arm.parameters:  # at the value that leaves the model unchanged
            setattr(module, parameter.name, parameter.create(module.config, parameter.neutral, ref.device, ref.dtype))
    install_attention(model)
    return modules


def arm_parameter_names(model: nn.Module) -> list[str]:
    """The names of the parameters `install_arm` added (what the gates-only fine-tune trains)."""
    added = {f".{p.name}" for arm in ATTENTION_ARMS.values() for p in arm.parameters}
    return [n for n, _ in model.named_parameters() if ".qbench_gate." in n or n.endswith(tuple(added))]


def arm_call(module: nn.Module, kwargs: dict) -> tuple[AttentionArm, Gate | None]:
    """The module's arm and `Gate` for one attention call (`kwargs` those of the call: the
    input X of an input-gated arm arrives there): g = 2 sigmoid(Z W + b), the sigmoid in
    float32 (bf16 autocast), Z cast to the gate's dtype; qbench.modeling.compose computes it."""
    arm: AttentionArm = module.qbench_arm
    if arm.gate_source is None:
        return arm, None
    x = kwargs.get(INPUT_KWARG)
    if arm.gate_source == "input" and x is None:
        raise RuntimeError("the input-gated arm did not receive the attention input (pre-hook missing)")
    gate = module.qbench_gate
    return arm, Gate(lambda z: gate(z.to(gate.weight.dtype)), module.layer_idx, x=x, scale=GATE_SCALE,
                     float_sigmoid=True)
