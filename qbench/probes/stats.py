"""Streaming probes: activation outliers, attention sinks, value and residual drains, gates.

Definitions (REFERENCE.md section 3, code-faithful to Bondarenko et al. 2023):
  max_inf_norm: per sample max|x| over the flattened (T x d) tensor, averaged over
    samples, then the max over tracked tensors.
  kurtosis: per sample E[(x - mu)^4] / (sigma^4 + 1e-6) over the flattened tensor (a
    Gaussian gives 3), averaged over samples; mean and max over tracked tensors.
  outlier_count_6: activations with |x| >= 6, per sample, summed over tracked tensors.
  outlier_features: hidden dimensions with |x| >= 6 in >= 25% of layers and >= 6% of
    sequence positions (Dettmers et al.), on the linear-layer inputs (attn/ffn input).
  massive_activations: |a| > 100 and |a| >= 1000 x the median |a| over the sequence's
    hidden states at that layer (Sun et al.) on the block outputs; the ratio-only variant
    drops the absolute threshold; `max_activation_position` is the token of the largest |a|.
  sink_rate@0.3: per window and (layer, head), the mean attention token 0 receives from
    the queries after it (query 0 excluded), thresholded at 0.3 per window; the share of
    (layer, head) pairs above it, averaged over windows.  sink_rate_gu@0.3: the same with
    query 0 included, as in Gu et al.'s released code (importance of token 0 = mean of
    P[i, 0] over all T queries); first_token_share: per layer, the mean over heads and the
    queries after token 0.  For normalisers whose rows need not sum to one (softpick,
    sigmoid, sink logit) the weight is P[i, 0] as computed.
  value_norm_ratio: ||V_0|| / mean_{j>0} ||V_j|| per layer and head;
  residual_norm_ratio: ||h_0|| / mean_{j>0} ||h_j|| per layer on block outputs.
Every statistic is a running sum: nothing keeps full activations or T x T maps.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from qbench.probes.sites import SITES, tracked_modules, value_projections

OUTLIER_THRESHOLD = 6.0
SINK_EPSILON = 0.3
SINK_CONVENTION = ("sink_rate@0.3: per window and (layer, head), the mean over queries 1..T-1 (query 0 excluded) of "
                   "the weight on token 0, thresholded at 0.3; % of (layer, head) pairs, averaged over windows. "
                   "sink_rate_gu@0.3: the same with query 0 included (Gu et al.'s released code). T = 64.")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class ActivationProbe:
    """Forward hooks on the tracked tensors; `summary()` gives the outlier metrics."""

    def __init__(self, model: torch.nn.Module):
        self.modules = tracked_modules(model)
        self.values = value_projections(model)
        self.n_layers = 1 + max(layer for layer, _ in self.modules)
        self.samples = 0
        self.max_sum = defaultdict(float)  # (layer, site) -> sum over samples of max|x|
        self.kurt_sum = defaultdict(float)
        self.count6 = 0
        self.feature_hits: dict[tuple[int, str], torch.Tensor] = {}  # positions with |x| >= 6 per dim
        self.positions = 0
        self.massive = {"count": 0, "ratio_only_count": 0, "max": 0.0, "positions": defaultdict(int)}
        self.residual_ratio_sum = torch.zeros(self.n_layers)
        self.value_ratio_sum: dict[int, torch.Tensor] = {}
        self.pending: dict[int, list[tuple[str, torch.Tensor]]] = {}  # a layer's sites until its output
        self.handles = []

    def __enter__(self):
        for key, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(key)))
        for layer, (module, heads) in enumerate(self.values):
            if module is not None:
                self.handles.append(module.register_forward_hook(self._value_hook(layer, heads)))
        return self

    def __exit__(self, *exc):
        self.pending.clear()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, key):
        layer, site = key

        def hook(module, inputs, output):
            x = _first(output).detach().float()  # (B, T, d)
            if layer == 0 and site == SITES[0]:
                self.samples += x.shape[0]
                self.positions += x.shape[0] * x.shape[1]
            # The layer's own output fires after every site inside it: the sites wait for
            # it, then all of the layer's statistics run as one batch of stacked operations
            # (a few dozen small ops per layer instead of per site).
            self.pending.setdefault(layer, []).append((site, x))
            if site == "block_output":
                self._layer_statistics(layer, self.pending.pop(layer))
        return hook

    def _layer_statistics(self, layer: int, items: list[tuple[str, torch.Tensor]]) -> None:
        by_shape: dict[tuple, list[tuple[str, torch.Tensor]]] = defaultdict(list)
        for site, x in items:
            by_shape[tuple(x.shape)].append((site, x))
        for group in by_shape.values():
            stacked = torch.stack([x.reshape(x.shape[0], -1) for _, x in group])  # (S, B, T*d)
            peak = torch.maximum(stacked.amax(dim=2), -stacked.amin(dim=2))  # (S, B) per-sample max|x|
            square = (stacked - stacked.mean(dim=2, keepdim=True)).square_()  # in place: one temporary
            var = square.mean(dim=2)
            kurtosis = (square.square_().mean(dim=2) / (var * var + 1e-6)).sum(dim=1)  # (S,)
            del square
            peaks = peak.sum(dim=1)
            for i, (site, _) in enumerate(group):
                self.max_sum[(layer, site)] += peaks[i]  # tensors: floats only in summary()
                self.kurt_sum[(layer, site)] += kurtosis[i]
            # |x| >= 6 is impossible below a site's peak: only sites that reach it pay for the
            # comparison pass, all of them in one batch (exact).
            over = (peak.amax(dim=1) >= OUTLIER_THRESHOLD).nonzero()[:, 0].tolist()
            if over:
                big = stacked[over].abs_() >= OUTLIER_THRESHOLD  # (S', B, T*d); indexing copied
                counts = big.sum(dim=(1, 2)).tolist()
                shape = group[0][1].shape
                for row, i in enumerate(over):
                    site = group[i][0]
                    self.count6 += int(counts[row])
                    if site in ("attn_input", "ffn_input"):
                        hits = big[row].reshape(shape).sum(dim=(0, 1)).cpu()
                        key = (layer, site)
                        self.feature_hits[key] = self.feature_hits.get(key, torch.zeros_like(hits)) + hits
        for site, x in items:
            if site == "block_output":
                self._massive(x)
                if x.shape[1] > 1:
                    norms = x.norm(dim=-1)  # (B, T)
                    ratio = norms[:, 0] / norms[:, 1:].mean(dim=1).clamp_min(1e-12)
                    self.residual_ratio_sum[layer] += ratio.sum().item()

    def _massive(self, x: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        magnitude = x.abs() if magnitude is None else magnitude  # (B, T, d)
        # Sun et al.: "about 1,000 times larger than the median magnitude of its hidden
        # states": the median over the layer's hidden states of the sequence (all T x d),
        # not over one token's vector (whose median is itself inflated at a sink token).
        # The median costs a sort; skip it where no element can reach 1000x it.  torch's
        # median is the ((n-1)//2)-th smallest, so median > peak/1000 exactly when fewer than
        # (n-1)//2 + 1 elements are <= peak/1000; then nothing is >= 1000 x median.
        self._massive_peak(magnitude)
        flat = magnitude.flatten(1)  # (B, T*d)
        peak = flat.amax(dim=1)
        possible = (flat <= peak[:, None] / 1000).sum(dim=1) >= (flat.shape[1] - 1) // 2 + 1
        if not bool(possible.any()):
            return
        flat, magnitude = flat[possible], magnitude[possible]
        median = flat.median(dim=1).values[:, None, None]
        ratio_hit = magnitude >= 1000 * median.clamp_min(1e-12)
        hit = ratio_hit & (magnitude > 100)
        self.massive["count"] += int(hit.sum())
        self.massive["ratio_only_count"] += int(ratio_hit.sum())
        for position in hit.any(dim=-1).nonzero()[:, 1].tolist():
            self.massive["positions"][position] += 1

    def _massive_peak(self, magnitude: torch.Tensor) -> None:
        peak = magnitude.max().item()
        if peak > self.massive["max"]:
            self.massive["max"] = peak
            self.massive["max_position"] = int(magnitude.amax(dim=(0, 2)).argmax())

    def _value_hook(self, layer, heads):
        def hook(module, inputs, output):
            v = _first(output).detach().float()  # (B, T, heads * D)
            b, t, _ = v.shape
            if t < 2:
                return
            norms = v.view(b, t, heads, -1).norm(dim=-1)  # (B, T, heads)
            ratio = norms[:, 0] / norms[:, 1:].mean(dim=1).clamp_min(1e-12)  # (B, heads)
            self.value_ratio_sum[layer] = self.value_ratio_sum.get(layer, torch.zeros(heads, device=v.device)) + ratio.sum(0)
        return hook

    def summary(self) -> dict:
        if self.samples == 0:
            raise RuntimeError("the activation probe saw no samples")
        n = self.samples
        per_site_max = {k: float(v) / n for k, v in self.max_sum.items()}
        per_site_kurt = {k: float(v) / n for k, v in self.kurt_sum.items()}
        per_layer = lambda values: [max(v for (l, _), v in values.items() if l == layer)  # noqa: E731
                                    for layer in range(self.n_layers)]
        layers_per_dim = defaultdict(set)
        for (layer, _), hits in self.feature_hits.items():
            for dim in (hits >= 0.06 * self.positions).nonzero()[:, 0].tolist():
                layers_per_dim[dim].add(layer)
        features = sorted(d for d, layers in layers_per_dim.items() if len(layers) >= 0.25 * self.n_layers)
        positions = sorted(self.massive["positions"].items(), key=lambda kv: -kv[1])[:5]
        return {
            "samples": n,
            "max_inf_norm": max(per_site_max.values()),
            "max_inf_norm_per_layer": per_layer(per_site_max),
            "max_inf_norm_per_site": {site: max(v for (_, s), v in per_site_max.items() if s == site)
                                      for site in sorted({s for _, s in per_site_max})},
            "kurtosis_mean": sum(per_site_kurt.values()) / len(per_site_kurt),
            "kurtosis_max": max(per_site_kurt.values()),
            "kurtosis_per_layer": per_layer(per_site_kurt),
            "outlier_count_6": self.count6 / n,
            "outlier_features": len(features),
            "outlier_feature_dims": features[:32],
            "massive_activations": self.massive["count"] / n,
            "massive_activations_ratio_only": self.massive["ratio_only_count"] / n,
            "massive_activation_max": self.massive["max"],
            "massive_activation_positions": [p for p, _ in positions],
            "max_activation_position": self.massive.get("max_position"),
            "residual_norm_ratio_per_layer": (self.residual_ratio_sum / n).tolist(),
            "value_norm_ratio_per_layer": [(self.value_ratio_sum[layer] / n).mean().item()
                                           for layer in sorted(self.value_ratio_sum)],
        }


class AttentionProbe:
    """Sink statistics from P[..., 0] (B, H, T), handed over by every attention path through
    the hooks' `first_column` (fused SDPA, explicit P, the low-precision kernel)."""

    def __init__(self):
        self.first_sum: dict[int, torch.Tensor] = {}  # layer -> (H,) sum over sequences
        self.above: dict[int, torch.Tensor] = {}
        self.above_gu: dict[int, torch.Tensor] = {}  # Gu et al.'s convention: query 0 included
        self.sequences: dict[int, int] = defaultdict(int)

    def _ensure(self, layer: int, heads: int, device=None) -> None:
        """Accumulators live on the model's device (the first column's)."""
        if layer not in self.first_sum:
            self.first_sum[layer] = torch.zeros(heads, device=device)
            self.above[layer], self.above_gu[layer] = torch.zeros_like(self.first_sum[layer]), torch.zeros_like(
                self.first_sum[layer])

    def observe(self, layer: int, probs: torch.Tensor) -> None:
        """probs (B, H, T, T)."""
        self.observe_first(layer, probs[..., 0])

    def observe_first(self, layer: int, column: torch.Tensor) -> None:
        """column (B, H, T): P[..., 0], the attention every query pays token 0."""
        if column.shape[-1] < 2:
            return
        column = column.detach().float()
        first = column[..., 1:].mean(dim=-1)  # (B, H): token 0's share from later queries
        first_gu = column.mean(dim=-1)  # (B, H): from every query, query 0 (which sees only token 0) included
        self._ensure(layer, first.shape[1], first.device)
        self.first_sum[layer] += first.sum(0)
        self.above[layer] += (first > SINK_EPSILON).float().sum(0)
        self.above_gu[layer] += (first_gu > SINK_EPSILON).float().sum(0)
        self.sequences[layer] += first.shape[0]

    def summary(self) -> dict:
        if not self.first_sum:
            raise RuntimeError("the attention probe saw no attention probabilities")
        layers = sorted(self.first_sum)
        share = [(self.first_sum[l] / self.sequences[l]).tolist() for l in layers]
        above = torch.cat([self.above[l] / self.sequences[l] for l in layers])
        above_gu = torch.cat([self.above_gu[l] / self.sequences[l] for l in layers])
        return {
            "sink_rate@0.3": 100.0 * above.mean().item(),  # percent of (layer, head) pairs
            "sink_rate_gu@0.3": 100.0 * above_gu.mean().item(),
            "sink_rate_convention": SINK_CONVENTION,
            "first_token_share_per_layer": [sum(s) / len(s) for s in share],
            "first_token_share_per_head": share,
            "first_token_share_mean": sum(sum(s) for s in share) / sum(len(s) for s in share),
        }


class GateProbe:
    def __init__(self):
        self.sum, self.count, self.sink, self.others, self.low = {}, {}, {}, {}, {}

    def observe(self, layer: int, gate: torch.Tensor) -> None:
        g = gate.detach().float()  # (B, H, T, 1 | D)
        heads = g.shape[1]
        per_head = g.transpose(0, 1).reshape(heads, -1)
        for store, value in ((self.sum, per_head.sum(1)), (self.low, (per_head < 0.1).float().sum(1)),
                             (self.sink, g[:, :, 0].transpose(0, 1).reshape(heads, -1).mean(1) * g.shape[0]),
                             (self.others, g[:, :, 1:].transpose(0, 1).reshape(heads, -1).mean(1) * g.shape[0])):
            store[layer] = store.get(layer, torch.zeros(heads, device=g.device)) + value
        self.count[layer] = self.count.get(layer, (0, 0))
        self.count[layer] = (self.count[layer][0] + per_head.shape[1], self.count[layer][1] + g.shape[0])

    def summary(self) -> dict:
        if not self.sum:
            return {}
        layers = sorted(self.sum)
        return {
            "gate_mean_per_head": [(self.sum[l] / self.count[l][0]).tolist() for l in layers],
            "gate_at_sink_token": [(self.sink[l] / self.count[l][1]).mean().item() for l in layers],
            "gate_at_other_tokens": [(self.others[l] / self.count[l][1]).mean().item() for l in layers],
            "gate_fraction_below_0.1": sum(self.low[l].sum().item() for l in layers)
            / sum(self.count[l][0] * len(self.sum[l]) for l in layers),
        }
