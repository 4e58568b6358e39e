"""Where the probes look: per layer, the tensors Bondarenko et al. track, found by module
name on qbench models, Llama-style and GPT-2-style Hugging Face models (quantized or not:
a quantizer's wrapper sits at the same name, so quantized models show their quantized
activations)."""
from __future__ import annotations

import torch.nn as nn

SITES = ("attn_input", "attn_output", "ffn_input", "ffn_output", "attn_residual", "block_output")

# site -> attribute path inside one layer module, per model family
_FAMILIES = {
    "qbench": {"attn_input": "attn_norm", "attn_output": "attn.o_proj", "ffn_input": "mlp_norm",
               "ffn_output": "mlp.fc2", "attn_residual": "attn_residual", "block_output": ""},
    "llama": {"attn_input": "input_layernorm", "attn_output": "self_attn.o_proj",
              "ffn_input": "post_attention_layernorm", "ffn_output": "mlp.down_proj", "block_output": ""},
    "gpt2": {"attn_input": "ln_1", "attn_output": "attn.c_proj", "ffn_input": "ln_2", "ffn_output": "mlp.c_proj",
             "block_output": ""},
}


def decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(family, layer modules) of a supported decoder."""
    from qbench.modeling.model import QBenchForCausalLM

    if isinstance(model, QBenchForCausalLM):
        return "qbench", list(model.model.layers)
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    if inner is not None and hasattr(inner, "layers"):
        return "llama", list(inner.layers)
    if inner is not None and hasattr(inner, "h"):
        return "gpt2", list(inner.h)
    raise NotImplementedError(f"probes do not know the layer layout of {type(model).__name__}")


def tracked_modules(model: nn.Module) -> dict[tuple[int, str], nn.Module]:
    family, layers = decoder_layers(model)
    found = {}
    for index, layer in enumerate(layers):
        for site, path in _FAMILIES[family].items():
            found[(index, site)] = layer.get_submodule(path) if path else layer
    return found


def value_projections(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(value projection module, number of value heads) per layer; None where fused."""
    family, layers = decoder_layers(model)
    out = []
    for layer in layers:
        if family == "qbench":
            out.append((layer.attn.v_proj, layer.attn.n_head))
        elif family == "llama":
            attn = layer.self_attn
            heads = getattr(attn.config, "num_key_value_heads", None) or attn.config.num_attention_heads
            out.append((attn.v_proj, heads))
        else:
            out.append((None, 0))
    return out
