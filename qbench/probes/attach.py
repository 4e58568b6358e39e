"""Attach every probe to a (possibly quantized) model for the duration of a `with` block."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from qbench.modeling.hooks import ObserverHooks, observing
from qbench.probes.stats import ActivationProbe, AttentionProbe, GateProbe


class SinkObserver(ObserverHooks):
    """P[..., 0] to the attention probe and the gates to the gate probe, after the hooks
    already there (a quantizer's), so probes on a quantized model see quantized
    probabilities.  With no inner hooks only token 0's column is needed: the attention
    keeps its fused path (or the kernel its blocks) and hands over P[..., 0] alone."""

    def __init__(self, inner, on_first_column, on_gate):
        super().__init__(inner, first_column_only=True)
        self.observe_first_column, self.observe_gate = on_first_column, on_gate


@contextmanager
def attach_probes(model: torch.nn.Module):
    """Yields (activation, attention, gate) probes; restores the model afterwards."""
    activation, attention, gates = ActivationProbe(model), AttentionProbe(), GateProbe()

    def observer(index, module, inner):
        return SinkObserver(inner, lambda first: attention.observe_first(index, first), gates.observe)

    with observing(model, observer), activation:
        yield activation, attention, gates


@torch.no_grad()
def run_probes(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int = 8, progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    model.eval()
    with attach_probes(model) as (activation, attention, gates):
        for start in tqdm(range(0, len(windows), batch_size), desc="probes", disable=not progress, leave=False):
            model(input_ids=torch.stack(windows[start: start + batch_size]))
    return {**activation.summary(), **attention.summary(), **gates.summary()}
