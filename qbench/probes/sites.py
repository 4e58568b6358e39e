"""Where the probes look: per layer, the tensors Bondarenko et al. track, taken from the
model family's read and write points of the residual stream (qbench.modeling.families:
qbench models, Llama-style and GPT-2-style Hugging Face models).  Quantized or not: a
quantizer's wrapper sits at the same name, so quantized models show their quantized
activations."""
from __future__ import annotations

import torch.nn as nn

from qbench.modeling.families import layer_points

SITES = ("attn_input", "attn_output", "ffn_input", "ffn_output", "attn_residual", "block_output")

# site -> the layer point whose output it is (None where the family has no such point)
_POINTS = {
    "attn_input": lambda p: p.attention_input,
    "attn_output": lambda p: p.attention_output,
    "ffn_input": lambda p: p.mlp_input,
    "ffn_output": lambda p: p.mlp_output,
    "attn_residual": lambda p: p.attention_residual,
    "block_output": lambda p: p.layer,
}


def tracked_modules(model: nn.Module) -> dict[tuple[int, str], nn.Module]:
    found = {}
    for index, points in enumerate(layer_points(model)):
        for site in SITES:
            module = _POINTS[site](points)
            if module is not None:
                found[(index, site)] = module
    return found


def value_projections(model: nn.Module) -> list[tuple[nn.Module | None, int]]:
    """(value projection module, number of value heads) per layer; (None, 0) where fused."""
    return [(p.value_projection, p.value_heads) for p in layer_points(model)]

