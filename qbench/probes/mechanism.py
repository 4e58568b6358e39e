"""Bigram-Backcopy mechanism metrics (Guo et al. 2024, arXiv 2410.13835).

For the first token (BOS, the would-be sink) and the non-trigger queries (the ones that
have nothing to copy and, in a softmax model, learn to park their attention on BOS):

- ``attn_s``: mean attention probability on BOS from non-trigger queries at positions
  t >= 1 (heads and layers averaged; per layer in ``per_layer``);
- ``val_s``: ||V_BOS|| (the raw value projection of BOS, per head, averaged), and
  ``val_s_ratio`` = ||V_BOS|| / mean_{j>=1} ||V_j|| so that arms with different value
  scales compare; for gated-value arms (vga) ``val_s_eff`` uses the gated value g*V, the
  vector the weighted sum actually reads;
- ``delta_logit_s``: mean over non-trigger queries of (score on BOS minus the mean score
  on the other visible keys), scores being Q K^T / sqrt(d) before the softmax.

Trigger queries are excluded because their job (copy the token before the trigger) is
the task itself, not the dormant-head behaviour the sink serves.
"""
from __future__ import annotations

import torch


class _CaptureHooks(torch.nn.Module):
    """Attention hooks (qbench.modeling.hooks) that keep one layer's scores, P (or, under a
    low-precision kernel, P[..., 0]) and gates, after the hooks already there (a
    quantizer's), so a quantized model's mechanism is measured as it computes."""

    first_column_only = False

    def __init__(self, store: dict, layer: int, gates: dict, inner=None):
        super().__init__()
        self.store, self.layer, self.gates, self.inner = store, layer, gates, inner
        self.store.setdefault(layer, {})

    def gate(self, layer, g):
        self.gates[layer] = g.detach()
        if self.inner is not None and hasattr(self.inner, "gate"):
            self.inner.gate(layer, g)

    def scores(self, x):
        x = self.inner.scores(x) if self.inner is not None else x
        self.store[self.layer]["scores"] = x.detach()
        return x

    def probs(self, x):
        x = self.inner.probs(x) if self.inner is not None else x
        self.store[self.layer]["probs"] = x.detach()
        return x

    def first_column(self, x):
        self.store[self.layer]["first"] = x.detach()

    def context(self, x):
        return self.inner.context(x) if self.inner is not None else x


@torch.no_grad()
def bb_mechanism(model, tokens: torch.Tensor, is_trigger) -> dict:
    """Metrics above for one batch of Bigram-Backcopy sequences (B, T) starting with BOS.
    `tokens` may live anywhere (a fixed CPU sample, say): they go to the model's device."""
    from qbench.device import model_device
    from qbench.modeling.model import QBenchAttention

    device = model_device(model)
    # queries at positions >= 1 whose token is not a trigger (the next token is a bigram draw);
    # the task's trigger table lives with the task (CPU), so the mask is made beside it
    query_mask = ~is_trigger(tokens)
    query_mask[:, 0] = False
    tokens = tokens.to(device)

    attention = [m for m in model.modules() if isinstance(m, QBenchAttention)]
    if not attention:
        raise TypeError("bb_mechanism needs a qbench model (QBenchAttention layers)")
    store: dict = {}
    values: dict = {}
    gates: dict = {}
    saved, hooks = [], []
    for module in attention:
        saved.append((module, module.qbench_hooks, module.qbench_kernel))
        module.qbench_hooks = _CaptureHooks(store, module.layer_idx, gates, module.qbench_hooks)
        hooks.append(module.v_proj.register_forward_hook(
            lambda mod, inp, out, i=module.layer_idx: values.__setitem__(i, out.detach())))
    was_training = model.training
    model.eval()
    try:
        model(tokens)  # (B, T) on the model's device
    finally:
        for module, saved_hooks, kernel in saved:
            module.qbench_hooks, module.qbench_kernel = saved_hooks, kernel
        for h in hooks:
            h.remove()
        model.train(was_training)

    b, t = tokens.shape
    qm = query_mask[:, None, :].float().to(device)  # (B, 1, T)
    n_q = qm.sum()
    per_layer = []
    for module in attention:
        i, h, hd = module.layer_idx, module.n_head, module.head_dim
        captured = store[i]
        # P[..., 0]: from P, or from the low-precision kernel's first column
        first = captured["probs"][..., 0] if "probs" in captured else captured["first"]
        attn_s = (first.float() * qm).sum() / (n_q * h)
        delta_logit = float("nan")  # the kernel exposes no scores
        if "scores" in captured:
            scores = captured["scores"].float()  # (B, H, T, T)
            causal = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()
            others = causal.clone()
            others[:, 0] = False
            n_others = others.sum(-1).clamp_min(1)  # (T,)
            other_mean = torch.where(others, scores, 0.0).sum(-1) / n_others  # (B, H, T)
            gap = scores[..., 0] - other_mean
            gap_mask = qm * (n_others > 0).float()
            delta_logit = (gap * gap_mask).sum() / (gap_mask.sum() * h)
        v = values[i].view(b, t, h, hd).float()
        norms = v.norm(dim=-1)  # (B, T, H)
        val_s = norms[:, 0].mean()
        ratio = (norms[:, 0] / norms[:, 1:].mean(dim=1).clamp_min(1e-12)).mean()
        row = {"layer": i, "attn_s": float(attn_s), "delta_logit_s": float(delta_logit),
               "val_s": float(val_s), "val_s_ratio": float(ratio)}
        gate = gates.get(i)
        if gate is not None and module.arm.gate_position == "value":
            eff = (gate.float().transpose(1, 2) * v).norm(dim=-1)  # (B, T, H)
            row["val_s_eff"] = float(eff[:, 0].mean())
            row["val_s_eff_ratio"] = float((eff[:, 0] / eff[:, 1:].mean(dim=1).clamp_min(1e-12)).mean())
        if gate is not None:
            g = gate.float().mean(dim=-1)  # (B, H, T)
            row["gate_bos"] = float(g[..., 0].mean())
            row["gate_others"] = float(g[..., 1:].mean())
        per_layer.append(row)
    keys = [k for k in per_layer[0] if k != "layer"]
    summary = {k: float(sum(r[k] for r in per_layer if k in r) / sum(1 for r in per_layer if k in r))
               for k in keys if any(k in r for r in per_layer)}
    summary["per_layer"] = per_layer
    return summary


@torch.no_grad()
def residual_peaks(model, tokens: torch.Tensor) -> list[float]:
    """Per layer, the residual-stream peak at BOS: max |h_0| over the median |h| of the
    sequence's hidden states after the layer (all T x d), averaged over sequences."""
    from qbench.device import model_device
    from qbench.probes.sites import decoder_layers

    _, layers = decoder_layers(model)
    peaks: dict[int, float] = {}
    handles = []
    for index, layer in enumerate(layers):
        def hook(module, inputs, output, i=index):
            h = (output[0] if isinstance(output, (tuple, list)) else output).detach().float().abs()  # (B, T, d)
            median = h.flatten(1).median(dim=1).values.clamp_min(1e-12)
            peaks[i] = float((h[:, 0].amax(dim=-1) / median).mean())
        handles.append(layer.register_forward_hook(hook))
    try:
        model(input_ids=tokens.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return [peaks[i] for i in sorted(peaks)]
