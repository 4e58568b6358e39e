"""Attach every probe to a (possibly quantized) model for the duration of a `with` block."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from qbench.probes.stats import ActivationProbe, AttentionProbe, GateProbe


class ObservingHooks(torch.nn.Module):
    """Attention hooks that report P[..., 0] and the gates, delegating to the hooks already
    there (a quantizer's), so probes on a quantized model see quantized probabilities.
    With no inner hooks only token 0's column is needed: `first_column_only` lets the
    attention keep its fused path (or the kernel its blocks) and hand over P[..., 0] alone."""

    def __init__(self, inner, on_first_column, on_gate):
        super().__init__()
        self.inner, self.on_first_column, self.on_gate = inner, on_first_column, on_gate
        self.first_column_only = inner is None

    def first_column(self, first):
        self.on_first_column(first)

    def gate(self, layer, g):
        self.on_gate(layer, g)
        if self.inner is not None and hasattr(self.inner, "gate"):
            self.inner.gate(layer, g)

    def scores(self, x):
        return self.inner.scores(x) if self.inner is not None else x

    def probs(self, x):
        return self.inner.probs(x) if self.inner is not None else x

    def context(self, x):
        return self.inner.context(x) if self.inner is not None else x


@contextmanager
def attach_probes(model: torch.nn.Module):
    """Yields (activation, attention, gate) probes; restores the model afterwards."""
    from qbench.modeling.model import attention_layers

    activation, attention, gates = ActivationProbe(model), AttentionProbe(), GateProbe()
    previous = getattr(model.config, "_attn_implementation", None)
    layers = attention_layers(model)  # switches stock HF models to the qbench implementation
    restore = []
    for index, module in layers:
        inner = getattr(module, "qbench_hooks", None)
        restore.append((module, inner))
        module.qbench_hooks = ObservingHooks(inner, lambda f, i=index: attention.observe_first(i, f), gates.observe)
    try:
        with activation:
            yield activation, attention, gates
    finally:
        for module, inner in restore:
            module.qbench_hooks = inner
        if getattr(model.config, "_attn_implementation", None) != previous and previous is not None:
            model.set_attn_implementation(previous)


@torch.no_grad()
def run_probes(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int = 8, progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    model.eval()
    with attach_probes(model) as (activation, attention, gates):
        for start in tqdm(range(0, len(windows), batch_size), desc="probes", disable=not progress, leave=False):
            model(input_ids=torch.stack(windows[start: start + batch_size]))
    return {**activation.summary(), **attention.summary(), **gates.summary()}
