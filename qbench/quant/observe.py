"""Run calibration batches through a model while watching some of its modules: the one
observation loop of the calibrated transforms (SmoothQuant, GPTQ, AWQ)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def observe(model: nn.Module, modules: Iterable[tuple[str, nn.Module]], on_tensor: Callable[[str, torch.Tensor], None],
            batches, what: str = "input") -> int:
    """Call on_tensor(name, x) with each named module's first input (`what="input"`) or its
    output, flattened to (tokens, features), for every calibration batch; returns the
    number of tokens run.  The hooks are removed whatever happens."""
    if what not in ("input", "output"):
        raise ValueError(f"what must be 'input' or 'output', not {what!r}")

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0] if what == "input" else output
            on_tensor(name, x.detach().reshape(-1, x.shape[-1]))
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules]
    tokens = 0
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(input_ids=batch.to(device))
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return tokens
