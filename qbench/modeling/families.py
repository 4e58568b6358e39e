"""Model families: where each supported decoder keeps its layers, attention, norms, MLP and
residual stream, and what a family cannot take.  The one module that knows model layouts:
the probes (where to look), the residual-stream transforms (SmoothQuant and rotation,
through qbench.quant.structure), the attention hooks (which modules to route), the planner's
refusals (qbench.quant.support) and the retrofit ask here, and none of them branches on a
family.

A family is a `Family` record of attribute paths, found by the checkpoint's `model_type`
(config.json), never by guessing from attribute names (Gemma has Llama's names and
another norm).  What a family cannot take is data too: `refuses` maps a need (below) to
the reason, and `config_refusals` add reasons that depend on config values; the planner
reads them from config.json before any weights load.

Needs a scheme or task may have (qbench.quant.handlers declares them per handler):
  attention    its attention routed through qbench (hooks.hf_attention): w8a8-pt's
               attention sites, the low-precision kernel, the KV cache, the probes;
  smoothquant  a norm -> readers group per attention and MLP input, to fold scales into;
  rotation     every norm foldable into its readers and every residual write a linear, so
               the stream can be rotated (no norm between a writer and the stream).

Layouts described (REFERENCE.md section 11):
  qbench   qbench's own models: LayerNorm with bias, learned positions, the attention arm
           a config field, identity placeholders at the residual sums;
  llama    Llama, SmolLM2, Mistral, Qwen2, Qwen3 (q/k norms inside attention): RMSNorm,
           RoPE, grouped-query attention, gated MLP; an arm may be retrofitted into them;
  gemma    Gemma: Llama's layout, RMSNorm scaling by (1 + w) (`norm_offset`);
  gemma2   Gemma2 and Gemma3 (text): (1 + w) norms, four per layer: the MLP reads
           `pre_feedforward_layernorm`, and norms after the attention and the MLP sit
           between the writers and the stream; soft-capped scores, sliding windows;
  gpt2     GPT-2: LayerNorm, fused QKV (`c_attn`), Conv1D linears (made nn.Linear by
           qbench.quant.linearize_conv1d before any transform), learned positions;
  opt      OPT: pre-LN, learned positions (offset 2), biases, separate q/k/v;
  gpt_neox GPT-NeoX / Pythia: fused QKV interleaved per head, parallel residual (two
           norms read the same stream), partial rotary;
  phi      Phi: attention and MLP in parallel on one LayerNorm, partial rotary;
  phi3     Phi3: RMSNorm, fused `qkv_proj` and `gate_up_proj`;
  olmo2    OLMo2: no norm before attention or MLP (norms after them, inside the
           residual), q/k norms;
  falcon   Falcon (7B layout: one LayerNorm feeding parallel attention and MLP); its
           attention does not go through transformers' attention interface.

A new family is one `Family` entry.  Every window starts with
`qbench.data.tokens.first_token_id(tokenizer)` (BOS, else EOS).

Paths: `layers`, `embeddings`, `final_norm` and `residual_sums` are inside the base model
(`model.base_model`: `model.model` of a causal LM, `transformer` for GPT-2); the others
inside one decoder layer ("" is the layer itself).  Module names handed out (e.g. for
SmoothQuant's groups) are full names from the model's root.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


class UnsupportedModel(ValueError):
    """The model is none of the known families, or its family lacks what was asked."""


NEEDS = ("attention", "smoothquant", "rotation")
_NO_INTERFACE = "computes its attention itself, not through transformers' attention interface"
_POST_NORMS = ("norms after the attention and the MLP sit between their output linears and the stream: "
               "a rotation has no linear after them to absorb Q")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type values of this layout
    layers: str  # the ModuleList of decoder layers
    attention: str  # the attention module (what carries `qbench_hooks`)
    attention_norm: str | None  # the norm whose output the attention reads (None: it reads the stream)
    attention_readers: tuple[str, ...]  # the linears reading it (a gate that reads it is added per arm)
    attention_writer: str  # the linear whose output is added back into the stream
    mlp_norm: str | None  # == attention_norm: one norm feeds attention and MLP in parallel
    mlp_readers: tuple[str, ...]
    mlp_writer: str
    value_projection: str | None  # the value projection; None where fused into one QKV linear
    embeddings: tuple[str, ...]  # added into the stream at its start
    final_norm: str
    # "layer": LayerNorm (centres, scales, shifts: a rotation needs a mean-free stream) | "rms"
    norm: str
    norm_offset: float = 0.0  # the norm scales by (norm_offset + weight): Gemma's 1 + w
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
    # need -> why this family cannot take it (NEEDS)
    refuses: tuple[tuple[str, str], ...] = ()
    # (needs, predicate on the config dict, why): refusals that depend on config values
    config_refusals: tuple[tuple[tuple[str, ...], Callable[[dict], bool], str], ...] = ()
    # stock q/k/v/o attention with grouped-query heads: an arm can be retrofitted (llama_arms)
    retrofit: bool = False

    def matches(self, model: nn.Module) -> bool:
        layers = _get(base_model(model), self.layers)
        return isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
            _get(layer, path) is not None for layer in layers for path in self._layer_paths())

    def _layer_paths(self) -> tuple[str, ...]:
        norms = tuple(n for n in (self.attention_norm, self.mlp_norm) if n)
        return (*norms, self.attention_writer, self.mlp_writer, *self.mlp_readers,
                *(f"{self.attention}.{p}" for p in self.attention_readers))

    def refusal(self, need: str, config: dict | None = None) -> str | None:
        """Why this family (with this config) cannot take `need`; None if it can."""
        if need not in NEEDS:
            raise ValueError(f"unknown need {need!r}; one of {NEEDS}")
        reason = dict(self.refuses).get(need)
        if reason is None and config is not None:
            reason = next((why for needs, applies, why in self.config_refusals if need in needs and applies(config)),
                          None)
        return reason


def _llama_like(name: str, model_types: tuple[str, ...], **kw) -> Family:
    layout = dict(layers="layers", attention="self_attn", attention_norm="input_layernorm",
                  attention_readers=("q_proj", "k_proj", "v_proj"), attention_writer="self_attn.o_proj",
                  mlp_norm="post_attention_layernorm", mlp_readers=("mlp.gate_proj", "mlp.up_proj"),
                  mlp_writer="mlp.down_proj", value_projection="self_attn.v_proj", embeddings=("embed_tokens",),
                  final_norm="norm", norm="rms")
    return Family(name, model_types, **{**layout, **kw})


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qbench", ("qbench",), layers="layers", attention="attn", attention_norm="attn_norm",
           attention_readers=("q_proj", "k_proj", "v_proj"), attention_writer="attn.o_proj",
           mlp_norm="mlp_norm", mlp_readers=("mlp.fc1",), mlp_writer="mlp.fc2", value_projection="attn.v_proj",
           embeddings=("embed_tokens", "embed_positions"), final_norm="final_norm", norm="layer",
           arm="arm", gate="gate_proj", embedding_sum="embed_sum", attention_residual="attn_residual",
           mlp_residual="mlp_residual", native=True),
    _llama_like("llama", ("llama", "mistral", "qwen2", "qwen3"), arm="qbench_arm", gate="qbench_gate",
                retrofit=True),
    _llama_like("gemma", ("gemma",), norm_offset=1.0),
    _llama_like("gemma2", ("gemma2", "gemma3_text"), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
                refuses=(("rotation", _POST_NORMS),)),
    Family("gpt2", ("gpt2",), layers="h", attention="attn", attention_norm="ln_1", attention_readers=("c_attn",),
           attention_writer="attn.c_proj", mlp_norm="ln_2", mlp_readers=("mlp.c_fc",), mlp_writer="mlp.c_proj",
           value_projection=None, embeddings=("wte", "wpe"), final_norm="ln_f", norm="layer"),
    Family("opt", ("opt",), layers="decoder.layers", attention="self_attn", attention_norm="self_attn_layer_norm",
           attention_readers=("q_proj", "k_proj", "v_proj"), attention_writer="self_attn.out_proj",
           mlp_norm="final_layer_norm", mlp_readers=("fc1",), mlp_writer="fc2", value_projection="self_attn.v_proj",
           embeddings=("decoder.embed_tokens", "decoder.embed_positions"), final_norm="decoder.final_layer_norm",
           norm="layer", config_refusals=(
               (("smoothquant", "rotation"), lambda c: not c.get("do_layer_norm_before", True),
                "post-LayerNorm OPT (do_layer_norm_before false): the norms read the residual sums"),
               (("smoothquant", "rotation"),
                lambda c: c.get("word_embed_proj_dim", c.get("hidden_size")) != c.get("hidden_size"),
                "OPT with project_in/project_out (word_embed_proj_dim differs from hidden_size)"))),
    Family("gpt_neox", ("gpt_neox",), layers="layers", attention="attention", attention_norm="input_layernorm",
           attention_readers=("query_key_value",), attention_writer="attention.dense",
           mlp_norm="post_attention_layernorm", mlp_readers=("mlp.dense_h_to_4h",), mlp_writer="mlp.dense_4h_to_h",
           value_projection=None, embeddings=("embed_in",), final_norm="final_layer_norm", norm="layer"),
    Family("phi", ("phi",), layers="layers", attention="self_attn", attention_norm="input_layernorm",
           attention_readers=("q_proj", "k_proj", "v_proj"), attention_writer="self_attn.dense",
           mlp_norm="input_layernorm", mlp_readers=("mlp.fc1",), mlp_writer="mlp.fc2",
           value_projection="self_attn.v_proj", embeddings=("embed_tokens",), final_norm="final_layernorm",
           norm="layer"),
    _llama_like("phi3", ("phi3",), attention_readers=("qkv_proj",), mlp_readers=("mlp.gate_up_proj",),
                value_projection=None),
    _llama_like("olmo2", ("olmo2",), attention_norm=None, mlp_norm=None, refuses=(
        ("smoothquant", "no norm before the attention or the MLP (OLMo2 normalises their outputs): "
                        "SmoothQuant has no norm to fold its scales into"),
        ("rotation", _POST_NORMS))),
    Family("falcon", ("falcon",), layers="h", attention="self_attention", attention_norm="input_layernorm",
           attention_readers=("query_key_value",), attention_writer="self_attention.dense",
           mlp_norm="input_layernorm", mlp_readers=("mlp.dense_h_to_4h",), mlp_writer="mlp.dense_4h_to_h",
           value_projection=None, embeddings=("word_embeddings",), final_norm="ln_f", norm="layer",
           refuses=(("attention", f"Falcon {_NO_INTERFACE}"),), config_refusals=(
               (("smoothquant", "rotation"), lambda c: c.get("new_decoder_architecture") or not c.get("parallel_attn"),
                "only Falcon's 7B layout is described (one LayerNorm, parallel attention and MLP)"),)),
)}
MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_for_type(model_type: str | None) -> Family | None:
    """The family of a config.json `model_type` (None: not a described layout)."""
    return MODEL_TYPES.get(model_type)


def unknown_type_reason(model_type: str | None) -> str:
    return (f"model type {model_type!r} is none of the described layouts ({', '.join(sorted(MODEL_TYPES))}); "
            "qbench.modeling.families describes each (one Family entry adds one)")


def base_model(model: nn.Module) -> nn.Module:
    """The decoder inside a causal LM (`model.model`, GPT-2's `transformer`), or the model."""
    return getattr(model, "base_model", model)


def family_of(model: nn.Module) -> Family:
    """The family of `model`'s config `model_type`, checked against its modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_for_type(model_type)
    if family is None:
        raise UnsupportedModel(f"{type(model).__name__}: {unknown_type_reason(model_type)}")
    if not family.matches(model):
        raise UnsupportedModel(f"{type(model).__name__} (model type {model_type!r}) lacks the modules of the "
                               f"{family.name} layout qbench.modeling.families describes (layers, attention, "
                               "norms, MLP)")
    return family


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

    attention_input: nn.Module | None  # the attention norm (None: the attention reads the stream)
    attention_output: nn.Module  # the attention's output projection
    mlp_input: nn.Module | None  # the MLP norm (None: the MLP reads the stream)
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
            _get(layer, family.attention_norm) if family.attention_norm else None,
            layer.get_submodule(family.attention_writer),
            _get(layer, family.mlp_norm) if family.mlp_norm else None, layer.get_submodule(family.mlp_writer),
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
    """One norm and the modules that read its output (in the order of the layer), and the
    linears whose outputs are added back into the stream after them (two where attention
    and MLP read one norm in parallel)."""

    name: str
    norm: nn.Module
    readers: list[tuple[str, nn.Module]]  # nn.Linear, GateLinear or HeadwiseGate (input_head gates)
    writers: list[tuple[str, nn.Linear]]


@dataclass
class ResidualStructure:
    family: str
    embeddings: list[tuple[str, nn.Embedding]]  # added into the stream at its start
    groups: list[NormGroup] = field(default_factory=list)
    final_norm: tuple[str, nn.Module] | None = None
    head: tuple[str, nn.Linear] | None = None
    layer_norm: bool = False  # LayerNorm (a rotation first makes the stream mean-free); else RMSNorm
    norm_offset: float = 0.0  # every norm scales by (norm_offset + weight)

    def scale(self, norm: nn.Module):
        """The factor a norm's output is scaled by: its weight, plus Gemma's offset."""
        return norm.weight.detach() + self.norm_offset

    def set_scale(self, norm: nn.Module, scale) -> None:
        norm.weight.copy_((scale - self.norm_offset).to(norm.weight.dtype))


INPUT_GATE_SOURCES = ("input", "input_head")  # gates that read the normed attention input


def residual_structure(model: nn.Module, need: str) -> ResidualStructure:
    """Every norm with its readers and writers, the embeddings, the final norm and the head,
    for the transform that `need`s it ("smoothquant" or "rotation"); UnsupportedModel with
    the family's reason where it cannot take that transform."""
    family = family_of(model)
    why = family.refusal(need, model.config.to_dict() if hasattr(model.config, "to_dict") else None)
    if why is not None:
        raise UnsupportedModel(f"{type(model).__name__} ({family.name} family) cannot take {need}: {why}")
    base = base_model(model)
    prefix = _name_of(model, base)
    s = ResidualStructure(family.name, [(_join(prefix, e), base.get_submodule(e)) for e in family.embeddings],
                          layer_norm=family.norm == "layer", norm_offset=family.norm_offset)
    for i, layer in enumerate(decoder_layers(model)):
        p = _join(prefix, f"{family.layers}.{i}")

        def named(path: str, p=p, layer=layer) -> tuple[str, nn.Module]:
            return f"{p}.{path}", layer.get_submodule(path)

        readers = [named(f"{family.attention}.{r}") for r in family.attention_readers]
        arm = arm_of(layer.get_submodule(family.attention), family)
        if arm is not None and arm.gate_source in INPUT_GATE_SOURCES:  # the gate reads the normed input too
            readers.append(named(f"{family.attention}.{family.gate}"))
        mlp_readers = [named(r) for r in family.mlp_readers]
        if family.mlp_norm == family.attention_norm:  # attention and MLP in parallel on one norm
            s.groups.append(NormGroup(f"{p}.{family.attention_norm}", layer.get_submodule(family.attention_norm),
                                      readers + mlp_readers, [named(family.attention_writer), named(family.mlp_writer)]))
            continue
        s.groups.append(NormGroup(f"{p}.{family.attention_norm}", layer.get_submodule(family.attention_norm),
                                  readers, [named(family.attention_writer)]))
        s.groups.append(NormGroup(f"{p}.{family.mlp_norm}", layer.get_submodule(family.mlp_norm),
                                  mlp_readers, [named(family.mlp_writer)]))
    s.final_norm = (_join(prefix, family.final_norm), base.get_submodule(family.final_norm))
    head = model.get_output_embeddings()
    s.head = (_name_of(model, head), head)
    convs = [name for group in s.groups for name, m in group.readers + group.writers if type(m).__name__ == "Conv1D"]
    if convs:
        raise UnsupportedModel(f"{convs[0]} is a Conv1D (weight stored transposed): call "
                               "qbench.quant.linearize_conv1d(model) first (quantize() does)")
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
