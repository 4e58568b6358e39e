"""Model families: where each supported decoder keeps its layers, attention, norms, MLP and
residual stream.  The one module that knows model layouts: the probes (where to look), the
residual-stream transforms (SmoothQuant and rotation, through qbench.quant.structure), the
attention hooks (which modules to route) and the retrofit ask here, and none of them
branches on a family.

Three families, each a `Family` record of attribute paths, recognised by having them:

  qbench  qbench's own models: LayerNorm with bias, learned positions, the attention arm
          a config field (its gate may read the normed input), identity placeholders at
          the residual sums (`embed_sum`, `attn_residual`, `mlp_residual`);
  llama   Llama-family HF models (Llama, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE,
          grouped-query attention, a gated MLP; an arm may be retrofitted into them
          (qbench.modeling.llama_arms);
  gpt2    GPT-2-style HF models: LayerNorm, one fused QKV projection (`c_attn`), Conv1D
          linears; attention and probe sites only: no transform places scales inside a
          fused projection.

Anything else is a clear error naming these.  A new family is one `Family` entry.  Every
window starts with `qbench.data.tokens.first_token_id(tokenizer)` (BOS, else EOS).

Paths: `layers`, `embeddings`, `final_norm` and `residual_sums` are inside the base model
(`model.base_model`: `model.model` of a causal LM, `transformer` for GPT-2); the others
inside one decoder layer ("" is the layer itself).  Module names handed out (e.g. for
SmoothQuant's groups) are full names from the model's root.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


class UnsupportedModel(ValueError):
    """The model is none of the known families, or its family lacks what was asked."""


@dataclass(frozen=True)
class Family:
    name: str
    layers: str  # the ModuleList of decoder layers
    attention: str  # the attention module (what carries `qbench_hooks`)
    attention_norm: str  # the norm whose output the attention reads
    attention_readers: tuple[str, ...]  # the linears reading it (a gate that reads it is added per arm)
    attention_writer: str  # the linear whose output is added back into the stream
    mlp_norm: str
    mlp_readers: tuple[str, ...]
    mlp_writer: str
    value_projection: str | None  # the value projection; None where fused into one QKV linear
    embeddings: tuple[str, ...]  # added into the stream at its start
    final_norm: str
    # "layer": LayerNorm (centres, scales, shifts: a rotation needs a mean-free stream) | "rms"
    norm: str
    # the attention attribute holding its `AttentionArm` and the one holding its gate module;
    # None: always softmax, no gate
    arm: str | None = None
    gate: str | None = None
    # identity placeholders at the residual sums (quantizers and probes replace or hook them):
    # tokens + positions (in the base model), after the attention and after the MLP (in a layer)
    embedding_sum: str | None = None
    attention_residual: str | None = None
    mlp_residual: str | None = None
    native: bool = False  # computes its attention itself; False: routed through transformers' registry
    transforms: bool = True  # SmoothQuant and rotation know where to put their scales
    # stock q/k/v/o attention with grouped-query heads: an arm can be retrofitted (llama_arms)
    retrofit: bool = False

    def matches(self, model: nn.Module) -> bool:
        layers = _get(base_model(model), self.layers)
        return isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
            _get(layer, path) is not None for layer in layers for path in self._layer_paths())

    def _layer_paths(self) -> tuple[str, ...]:
        return (self.attention_norm, self.attention_writer, self.mlp_norm, self.mlp_writer, *self.mlp_readers,
                *(f"{self.attention}.{p}" for p in self.attention_readers))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qbench", layers="layers", attention="attn", attention_norm="attn_norm",
           attention_readers=("q_proj", "k_proj", "v_proj"), attention_writer="attn.o_proj",
           mlp_norm="mlp_norm", mlp_readers=("mlp.fc1",), mlp_writer="mlp.fc2", value_projection="attn.v_proj",
           embeddings=("embed_tokens", "embed_positions"), final_norm="final_norm", norm="layer",
           arm="arm", gate="gate_proj", embedding_sum="embed_sum", attention_residual="attn_residual",
           mlp_residual="mlp_residual", native=True),
    Family("llama", layers="layers", attention="self_attn", attention_norm="input_layernorm",
           attention_readers=("q_proj", "k_proj", "v_proj"), attention_writer="self_attn.o_proj",
           mlp_norm="post_attention_layernorm", mlp_readers=("mlp.gate_proj", "mlp.up_proj"),
           mlp_writer="mlp.down_proj", value_projection="self_attn.v_proj", embeddings=("embed_tokens",),
           final_norm="norm", norm="rms", arm="qbench_arm", gate="qbench_gate", retrofit=True),
    Family("gpt2", layers="h", attention="attn", attention_norm="ln_1", attention_readers=("c_attn",),
           attention_writer="attn.c_proj", mlp_norm="ln_2", mlp_readers=("mlp.c_fc",), mlp_writer="mlp.c_proj",
           value_projection=None, embeddings=("wte", "wpe"), final_norm="ln_f", norm="layer", transforms=False),
)}


def base_model(model: nn.Module) -> nn.Module:
    """The decoder inside a causal LM (`model.model`, GPT-2's `transformer`), or the model."""
    return getattr(model, "base_model", model)


def family_of(model: nn.Module) -> Family:
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    raise UnsupportedModel(f"{type(model).__name__} is none of the known model families ({', '.join(FAMILIES)}); "
                           "qbench.modeling.families lists what each needs (layers, attention, norms, MLP)")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    family = family_of(model)
    return list(_get(base_model(model), family.layers))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's attention module, in layer order."""
    family = family_of(model)
    return [layer.get_submodule(family.attention) for layer in decoder_layers(model)]


def arm_of(attention: nn.Module, family: Family):
    """The `AttentionArm` an attention module computes; None for stock softmax."""
    return getattr(attention, family.arm, None) if family.arm else None


@dataclass(frozen=True)
class LayerPoints:
    """Where one decoder layer reads and writes the residual stream (modules whose outputs
    are those tensors)."""

    attention_input: nn.Module  # the attention norm
    attention_output: nn.Module  # the attention's output projection
    mlp_input: nn.Module  # the MLP norm
    mlp_output: nn.Module  # the MLP's output projection
    attention_residual: nn.Module | None  # the stream after the attention sum (qbench only)
    layer: nn.Module  # its output is the stream after the layer
    value_projection: nn.Module | None  # None where fused into one QKV linear
    value_heads: int  # heads of the value projection (KV heads under grouped-query attention)


def layer_points(model: nn.Module) -> list[LayerPoints]:
    family = family_of(model)
    config = model.config
    value_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out = []
    for layer in decoder_layers(model):
        value = layer.get_submodule(family.value_projection) if family.value_projection else None
        out.append(LayerPoints(
            layer.get_submodule(family.attention_norm), layer.get_submodule(family.attention_writer),
            layer.get_submodule(family.mlp_norm), layer.get_submodule(family.mlp_writer),
            layer.get_submodule(family.attention_residual) if family.attention_residual else None,
            layer, value, value_heads if value is not None else 0))
    return out


def residual_sums(model: nn.Module) -> list[str]:
    """Full names of the identity placeholders at the residual sums (none in stock models)."""
    family = family_of(model)
    names = [family.embedding_sum] if family.embedding_sum else []
    for i in range(len(decoder_layers(model))):
        names += [f"{family.layers}.{i}.{s}" for s in (family.attention_residual, family.mlp_residual) if s]
    prefix = _name_of(model, base_model(model))
    return [_join(prefix, name) for name in names]


# -- the residual stream as the transforms see it ---------------------------------------

@dataclass
class NormGroup:
    """One norm and the modules that read its output (in the order of the layer)."""

    name: str
    norm: nn.Module
    readers: list[tuple[str, nn.Module]]  # nn.Linear, GateLinear or HeadwiseGate (input_head gates)
    writer: tuple[str, nn.Linear]  # the linear whose output is added back into the stream


@dataclass
class ResidualStructure:
    family: str
    embeddings: list[tuple[str, nn.Embedding]]  # added into the stream at its start
    groups: list[NormGroup] = field(default_factory=list)
    final_norm: tuple[str, nn.Module] | None = None
    head: tuple[str, nn.Linear] | None = None
    layer_norm: bool = False  # LayerNorm (a rotation first makes the stream mean-free); else RMSNorm


INPUT_GATE_SOURCES = ("input", "input_head")  # gates that read the normed attention input


def residual_structure(model: nn.Module) -> ResidualStructure:
    """Every norm with its readers and writer, the embeddings, the final norm and the head."""
    family = family_of(model)
    if not family.transforms:
        raise UnsupportedModel(f"{type(model).__name__} ({family.name} family) is neither a qbench model nor a "
                               "Llama-family decoder: SmoothQuant and rotation schemes cannot place their scales "
                               "in it (it computes Q, K and V in one fused projection)")
    base = base_model(model)
    prefix = _name_of(model, base)
    s = ResidualStructure(family.name, [(_join(prefix, e), base.get_submodule(e)) for e in family.embeddings],
                          layer_norm=family.norm == "layer")
    for i, layer in enumerate(decoder_layers(model)):
        p = _join(prefix, f"{family.layers}.{i}")

        def named(path: str, p=p, layer=layer) -> tuple[str, nn.Module]:
            return f"{p}.{path}", layer.get_submodule(path)

        readers = [named(f"{family.attention}.{r}") for r in family.attention_readers]
        arm = arm_of(layer.get_submodule(family.attention), family)
        if arm is not None and arm.gate_source in INPUT_GATE_SOURCES:  # the gate reads the normed input too
            readers.append(named(f"{family.attention}.{family.gate}"))
        s.groups.append(NormGroup(f"{p}.{family.attention_norm}", layer.get_submodule(family.attention_norm),
                                  readers, named(family.attention_writer)))
        s.groups.append(NormGroup(f"{p}.{family.mlp_norm}", layer.get_submodule(family.mlp_norm),
                                  [named(r) for r in family.mlp_readers], named(family.mlp_writer)))
    s.final_norm = (_join(prefix, family.final_norm), base.get_submodule(family.final_norm))
    head = model.get_output_embeddings()
    s.head = (_name_of(model, head), head)
    return s


def _get(module: nn.Module, path: str):
    """The submodule (or attribute) at a dotted path; None where it does not exist."""
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
