"""Where the residual stream of a pre-norm decoder is read and written: what SmoothQuant
(fold scales into a norm and its readers) and rotations (QuaRot: rotate everything that
reads or writes the stream) need to know about a model.

Two families are known: qbench's own models (LayerNorm with bias, learned positions, an
optional gate reading the normed input) and Llama-family Hugging Face models (RMSNorm,
RoPE: Llama, SmolLM2, Mistral, Qwen2).  Anything else is a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


class UnsupportedModel(ValueError):
    """The transform does not know where this model's residual stream is read and written."""


@dataclass
class NormGroup:
    """One norm and the modules that read its output (in the order of the layer)."""

    name: str
    norm: nn.Module
    readers: list[tuple[str, nn.Module]]  # nn.Linear, GateLinear or HeadwiseGate (input_head gates)
    writer: tuple[str, nn.Linear]  # the linear whose output is added back into the stream


@dataclass
class ResidualStructure:
    family: str  # "qbench" | "llama"
    embeddings: list[tuple[str, nn.Embedding]]  # added into the stream at its start
    groups: list[NormGroup] = field(default_factory=list)
    final_norm: tuple[str, nn.Module] | None = None
    head: tuple[str, nn.Linear] | None = None

    @property
    def layer_norm(self) -> bool:
        return self.family == "qbench"


def is_gate(module: nn.Module) -> bool:
    from qbench.modeling.model import GateLinear, HeadwiseGate

    return isinstance(module, (GateLinear, HeadwiseGate))


def residual_structure(model: nn.Module) -> ResidualStructure:
    from qbench.modeling.model import QBenchForCausalLM

    if isinstance(model, QBenchForCausalLM):
        return _qbench_structure(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None and len(layers) and all(
            hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
            and all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) for layer in layers):
        return _llama_structure(model)
    raise UnsupportedModel(f"{type(model).__name__} is neither a qbench model nor a Llama-family decoder "
                           "(input_layernorm, q/k/v/o_proj, post_attention_layernorm, gate/up/down_proj): "
                           "SmoothQuant and rotation schemes cannot place their scales in it")


def _qbench_structure(model) -> ResidualStructure:
    inner = model.model
    s = ResidualStructure("qbench", [("model.embed_tokens", inner.embed_tokens),
                                     ("model.embed_positions", inner.embed_positions)])
    for i, block in enumerate(inner.layers):
        p = f"model.layers.{i}"
        attn = block.attn
        readers = [(f"{p}.attn.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
        if attn.arm.gate_source in ("input", "input_head"):  # the gate reads the normed input too
            readers.append((f"{p}.attn.gate_proj", attn.gate_proj))
        s.groups.append(NormGroup(f"{p}.attn_norm", block.attn_norm, readers, (f"{p}.attn.o_proj", attn.o_proj)))
        s.groups.append(NormGroup(f"{p}.mlp_norm", block.mlp_norm, [(f"{p}.mlp.fc1", block.mlp.fc1)],
                                  (f"{p}.mlp.fc2", block.mlp.fc2)))
    s.final_norm = ("model.final_norm", inner.final_norm)
    s.head = ("lm_head", model.lm_head)
    return s


def _llama_structure(model) -> ResidualStructure:
    inner = model.model
    s = ResidualStructure("llama", [("model.embed_tokens", inner.embed_tokens)])
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        readers = [(f"{p}.self_attn.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
        arm = getattr(attn, "qbench_arm", None)  # a retrofitted gate (qbench.modeling.llama_arms)
        if arm is not None and arm.gate_source == "input":  # it reads the normed input too
            readers.append((f"{p}.self_attn.qbench_gate", attn.qbench_gate))
        s.groups.append(NormGroup(f"{p}.input_layernorm", layer.input_layernorm, readers,
                                  (f"{p}.self_attn.o_proj", attn.o_proj)))
        s.groups.append(NormGroup(f"{p}.post_attention_layernorm", layer.post_attention_layernorm,
                                  [(f"{p}.mlp.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj")],
                                  (f"{p}.mlp.down_proj", mlp.down_proj)))
    s.final_norm = ("model.norm", inner.norm)
    s.head = ("lm_head", model.get_output_embeddings())
    return s
