"""Module surgery shared by the backends and transforms: which linears a scheme quantizes,
how a submodule is swapped, and GPT-2's Conv1D turned into the nn.Linear every backend sees."""
from __future__ import annotations

import torch
import torch.nn as nn


def quantizable_linears(model: nn.Module, quantize_gates: bool = False) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear except the LM head (kept in full precision, as in Bondarenko's
    protocol) and, unless asked, the attention gates."""
    # imported here: qbench.modeling loads transformers, which loads optional packages (hqq,
    # torchao); importing qbench.quant must not (tests/test_quant_registry.py)
    from qbench.modeling.model import GateLinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
        and (quantize_gates or not isinstance(module, GateLinear))
    ]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` by `module`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def linearize_conv1d(model: nn.Module) -> int:
    """Replace GPT-2-style Conv1D layers (x @ W + b, W of shape (in, out)) by the equivalent
    nn.Linear, so every backend sees them (quanto, for one, silently skips Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in convs:
        linear = nn.Linear(conv.weight.shape[0], conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        set_submodule(model, name, linear)
    return len(convs)
