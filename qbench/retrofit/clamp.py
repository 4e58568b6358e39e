"""The clamp of the clamp-and-repair test (issue 32, H2): the first position's output of one
decoder layer's MLP (its down projection: where SmolLM2's massive activation is written)
is capped elementwise at +/- C, on every forward pass, quantized or not.

The cap is a forward hook on the layer's MLP module (the parent of the family's MLP
writer), not on the writer itself, so a quantizer that swaps the down projection for its
own module keeps the clamp in force.  `auto_cap` chooses C from the data: the largest
|output| of that MLP at the non-first positions of fixed training windows (the range the
model writes everywhere but at the sink), so the clamp removes only what is extreme at
the first position.  The cap and how it was chosen are recorded in retrofit.json, and
`load_retrofit` installs the same hook, so every evaluation of the model runs clamped.
"""
from __future__ import annotations

import torch

HOOK_FLAG = "_qbench_clamp"


def mlp_module(model, layer: int) -> torch.nn.Module:
    """The module whose output is layer `layer`'s MLP write into the residual stream."""
    from qbench.modeling.families import decoder_layers, family_of

    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"clamp_layer {layer}: the model has {len(blocks)} layers (0-{len(blocks) - 1})")
    writer = family_of(model).mlp_writer
    parent = writer.rpartition(".")[0]
    return blocks[layer].get_submodule(parent or writer)


@torch.no_grad()
def auto_cap(model, layer: int, windows: torch.Tensor) -> float:
    """max |MLP output| of `layer` over the non-first positions of `windows` (fp32 model)."""
    seen: list[float] = []

    def hook(module, args, output):
        seen.append(float(output[:, 1:].detach().abs().max()))

    handle = mlp_module(model, layer).register_forward_hook(hook)
    try:
        model(windows)
    finally:
        handle.remove()
    return max(seen)


def install_clamp(model, layer: int, cap: float):
    """Caps the first position of layer `layer`'s MLP output at +/- cap; returns the hook handle."""
    if not cap > 0:
        raise ValueError(f"clamp cap must be > 0, got {cap}")
    module = mlp_module(model, layer)

    def hook(module, args, output):
        first = output[:, :1].clamp(-cap, cap)
        return torch.cat([first, output[:, 1:]], dim=1)

    handle = module.register_forward_hook(hook)
    setattr(module, HOOK_FLAG, {"layer": layer, "cap": cap})
    return handle


def clamp_in_force(model) -> dict | None:
    """The clamp installed on `model` ({layer, cap}), or None."""
    for module in model.modules():
        if getattr(module, HOOK_FLAG, None):
            return dict(getattr(module, HOOK_FLAG))
    return None
