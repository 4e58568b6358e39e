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

from qbench.modeling.families import arm_of, decoder_layers, family_of, layer_points
from qbench.modeling.hooks import ObserverHooks, observing


class _Capture(ObserverHooks):
    """Keeps one layer's scores, P (or, under a low-precision kernel, P[..., 0]) and gates,
    after the hooks already there (a quantizer's), so a quantized model's mechanism is
    measured as it computes."""

    def __init__(self, inner, store: dict, gates: dict):
        super().__init__(inner)
        self.store, self.gates = store, gates

    def observe_scores(self, x):
        self.store["scores"] = x.detach()

    def observe_probs(self, x):
        self.store["probs"] = x.detach()

    def observe_first_column(self, x):
        self.store["first"] = x.detach()

    def observe_gate(self, layer, g):
        self.gates[layer] = g.detach()


@torch.no_grad()
def bb_mechanism(model, tokens: torch.Tensor, is_trigger) -> dict:
    """Metrics above for one batch of Bigram-Backcopy sequences (B, T) starting with BOS.
    `tokens` may live anywhere (a fixed CPU sample, say): they go to the model's device."""
    from qbench.device import model_device

    device = model_device(model)
    # queries at positions >= 1 whose token is not a trigger (the next token is a bigram draw);
    # the task's trigger table lives with the task (CPU), so the mask is made beside it
    query_mask = ~is_trigger(tokens)
    query_mask[:, 0] = False
    tokens = tokens.to(device)

    family, points = family_of(model), layer_points(model)
    if any(p.value_projection is None for p in points):
        raise TypeError(f"bb_mechanism needs a separate value projection per layer; {type(model).__name__} "
                        f"({family.name} family) fuses it into one QKV linear")
    store: dict = {}
    values: dict = {}
    gates: dict = {}

    def capture(index, module, inner):
        return _Capture(inner, store.setdefault(index, {}), gates)

    hooks = [p.value_projection.register_forward_hook(
        lambda mod, inp, out, i=i: values.__setitem__(i, out.detach())) for i, p in enumerate(points)]
    was_training = model.training
    model.eval()
    try:
        with observing(model, capture) as layers:
            model(tokens)  # (B, T) on the model's device
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    b, t = tokens.shape
    qm = query_mask[:, None, :].float().to(device)  # (B, 1, T)
    n_q = qm.sum()
    per_layer = []
    for (i, module), point in zip(layers, points):
        captured = store[i]
        # P[..., 0]: from P, or from the low-precision kernel's first column
        first = captured["probs"][..., 0] if "probs" in captured else captured["first"]  # (B, H, T)
        h = first.shape[1]
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
        v = values[i].view(b, t, point.value_heads, -1).float()  # (B, T, H_kv, D)
        norms = v.norm(dim=-1)  # (B, T, H)
        val_s = norms[:, 0].mean()
        ratio = (norms[:, 0] / norms[:, 1:].mean(dim=1).clamp_min(1e-12)).mean()
        row = {"layer": i, "attn_s": float(attn_s), "delta_logit_s": float(delta_logit),
               "val_s": float(val_s), "val_s_ratio": float(ratio)}
        gate = gates.get(i)
        arm = arm_of(module, family)
        if gate is not None and arm.gate_position == "value":
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

    layers = decoder_layers(model)
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
