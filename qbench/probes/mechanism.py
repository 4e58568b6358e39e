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
    """Attention hooks (qbench.modeling.hooks) that keep one layer's scores, P and gates."""

    first_column_only = False

    def __init__(self, store: dict, layer: int, gates: dict):
        super().__init__()
        self.store, self.layer, self.gates = store, layer, gates

    def gate(self, layer, g):
        self.gates[layer] = g.detach()

    def scores(self, x):
        self.store.setdefault(self.layer, {})["scores"] = x.detach()
        return x

    def probs(self, x):
        self.store[self.layer]["probs"] = x.detach()
        return x

    def context(self, x):
        return x


@torch.no_grad()
def bb_mechanism(model, tokens: torch.Tensor, is_trigger) -> dict:
    """Metrics above for one batch of Bigram-Backcopy sequences (B, T) starting with BOS."""
    from qbench.modeling.model import QBenchAttention

    attention = [m for m in model.modules() if isinstance(m, QBenchAttention)]
    if not attention:
        raise TypeError("bb_mechanism needs a qbench model (QBenchAttention layers)")
    store: dict = {}
    values: dict = {}
    gates: dict = {}
    saved, hooks = [], []
    for module in attention:
        saved.append((module, module.qbench_hooks, module.qbench_kernel))
        module.qbench_hooks, module.qbench_kernel = _CaptureHooks(store, module.layer_idx, gates), None
        hooks.append(module.v_proj.register_forward_hook(
            lambda mod, inp, out, i=module.layer_idx: values.__setitem__(i, out.detach())))
    was_training = model.training
    model.eval()
    try:
        model(tokens)
    finally:
        for module, saved_hooks, kernel in saved:
            module.qbench_hooks, module.qbench_kernel = saved_hooks, kernel
        for h in hooks:
            h.remove()
        model.train(was_training)

    b, t = tokens.shape
    # queries at positions >= 1 whose token is not a trigger (the next token is a bigram draw)
    query_mask = ~is_trigger(tokens)
    query_mask[:, 0] = False
    qm = query_mask[:, None, :].float()  # (B, 1, T)
    n_q = qm.sum()
    per_layer = []
    for module in attention:
        i, h, hd = module.layer_idx, module.n_head, module.head_dim
        probs, scores = store[i]["probs"].float(), store[i]["scores"].float()  # (B, H, T, T)
        attn_s = (probs[..., 0] * qm).sum() / (n_q * h)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
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
