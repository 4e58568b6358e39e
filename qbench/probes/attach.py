"""Attach every probe to a (possibly quantized) model for the duration of a `with` block."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from qbench.probes.stats import ActivationProbe, AttentionProbe, GateProbe


class ObservingSites(torch.nn.Module):
    """Attention sites that report the probabilities and delegate to the sites already
    there (a quantizer's), so probes on a quantized model see quantized probabilities.
    With no inner sites only token 0's column is needed: `first_column_only` lets the
    attention keep its fused path and hand over P[..., 0] alone."""

    def __init__(self, inner, callback, first_callback=None):
        super().__init__()
        self.inner, self.callback, self.first_callback = inner, callback, first_callback
        self.first_column_only = inner is None and first_callback is not None

    def first_column(self, first):
        self.first_callback(first)

    def scores(self, x):
        return self.inner.scores(x) if self.inner is not None else x

    def probs(self, x):
        x = self.inner.probs(x) if self.inner is not None else x
        self.callback(x)
        return x

    def context(self, x):
        return self.inner.context(x) if self.inner is not None else x


@contextmanager
def attach_probes(model: torch.nn.Module):
    """Yields (activation, attention, gate) probes; restores the model afterwards."""
    from qbench.modeling.model import QBenchAttention

    activation, attention, gates = ActivationProbe(model), AttentionProbe(), GateProbe()
    restore = []
    ours = [m for m in model.modules() if isinstance(m, QBenchAttention)]
    if ours:
        for module in ours:
            if module.kernel is not None:
                restore.append((module.kernel, "observer", module.kernel.observer))
                module.kernel.observer = lambda mod, head, p: attention.observe_block(mod.layer_idx, head, mod.n_head, p)
            else:
                restore.append((module, "sites", module.sites))
                module.sites = ObservingSites(module.sites, lambda p, i=module.layer_idx: attention.observe(i, p),
                                              lambda f, i=module.layer_idx: attention.observe_first(i, f))
            restore.append((module, "gate_observer", module.gate_observer))
            module.gate_observer = gates.observe
    else:
        from qbench.quant.attention_registry import IMPLEMENTATION, install_attention

        previous = model.config._attn_implementation
        modules = install_attention(model)
        if previous != IMPLEMENTATION:
            restore.append((None, "attn_implementation", previous))
        heads = model.config.num_attention_heads
        for index, module in enumerate(modules):
            kernel = getattr(module, "qbench_kernel", None)
            if kernel is not None:
                restore.append((kernel, "observer", kernel.observer))
                kernel.observer = lambda mod, head, p: attention.observe_block(
                    getattr(mod, "layer_idx", 0), head, heads, p)
            else:
                restore.append((module, "qbench_sites", getattr(module, "qbench_sites", None)))
                module.qbench_sites = ObservingSites(getattr(module, "qbench_sites", None),
                                                     lambda p, i=index: attention.observe(i, p))
    try:
        with activation:
            yield activation, attention, gates
    finally:
        for owner, name, value in reversed(restore):
            if owner is None:
                model.set_attn_implementation(value)
            else:
                setattr(owner, name, value)


@torch.no_grad()
def run_probes(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int = 8, progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    model.eval()
    with attach_probes(model) as (activation, attention, gates):
        for start in tqdm(range(0, len(windows), batch_size), desc="probes", disable=not progress, leave=False):
            model(input_ids=torch.stack(windows[start: start + batch_size]))
    return {**activation.summary(), **attention.summary(), **gates.summary()}
