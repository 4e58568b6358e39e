"""Bondarenko et al.'s simulated-quantization protocol (the `w8a8-pt` family).

x_hat = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z): symmetric per-tensor (or
per-channel / group) weights; asymmetric static per-tensor activations whose ranges are
running min-max estimates (momentum 0.9) over calibration batches, or percentiles.

Two steps, as in gpt-fast: `prepare` swaps modules and attaches observers (they measure
and pass values through unchanged), the caller runs calibration batches, then
`freeze` turns every observer into a fixed quantizer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qbench.quant.simulated import _set_submodule, quantizable_linears


def fake_quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1) - zero_point)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an asymmetric grid covering [lo, hi] (and 0)."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return scale, torch.round(-lo / scale)


def quantize_weight(weight: torch.Tensor, bits: int, granularity: str, group_size: int | None = None,
                    symmetric: bool = True, range_method: str = "minmax") -> torch.Tensor:
    """Fake-quantized weight (out, in): per_tensor | per_channel | group (along `in`)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    if granularity == "group":
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group size {group_size}")
        rows = w.reshape(-1, group_size)
    elif granularity == "per_channel":
        rows = w
    elif granularity == "per_tensor":
        rows = w.reshape(1, -1)
    else:
        raise ValueError(f"unknown weight granularity {granularity!r}")
    candidates = [1.0] if range_method == "minmax" else torch.linspace(0.3, 1.0, 36).tolist()
    best, best_error = None, None
    for ratio in candidates:  # "mse": grid search of the clipping ratio, per row
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = (rows.abs().amax(dim=1, keepdim=True) * ratio).clamp_min(1e-8) / qmax
            q = torch.clamp(torch.round(rows / scale), -qmax, qmax) * scale
        else:
            scale, zero = affine_params(rows.amin(dim=1, keepdim=True) * ratio,
                                        rows.amax(dim=1, keepdim=True) * ratio, bits)
            q = fake_quantize_affine(rows, scale, zero, bits)
        error = (q - rows).pow(2).sum(dim=1, keepdim=True)
        if best is None:
            best, best_error = q, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, q, best), torch.minimum(error, best_error)
    return best.reshape(out_features, in_features)


class ActivationQuantizer(nn.Module):
    """Static asymmetric per-tensor quantizer with a running min-max (or percentile) range.
    Infinite values (the -inf of masked attention scores) pass through untouched."""

    def __init__(self, bits: int, momentum: float = 0.9, estimator: str = "minmax", percentile: float = 99.99):
        super().__init__()
        self.bits, self.momentum, self.estimator, self.percentile = bits, momentum, estimator, percentile
        self.register_buffer("lo", torch.tensor(float("nan")))
        self.register_buffer("hi", torch.tensor(float("nan")))
        self.calibrating = True
        self.observed = 0

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = x.detach().float()
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return None, None
        if self.estimator == "minmax":
            return values.min(), values.max()
        if values.numel() > 2_000_000:  # kthvalue on a strided subsample keeps memory flat
            values = values[:: values.numel() // 2_000_000 + 1]
        k_hi = max(1, int(round(values.numel() * self.percentile / 100)))
        k_lo = max(1, values.numel() - k_hi + 1)
        return values.kthvalue(k_lo).values, values.kthvalue(k_hi).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            lo, hi = self._batch_range(x)
            if lo is not None:
                if self.observed == 0:
                    self.lo.copy_(lo), self.hi.copy_(hi)
                else:  # running min-max with momentum (Bondarenko's estimator)
                    self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                    self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
                self.observed += 1
            return x
        if self.observed == 0:
            raise RuntimeError("activation quantizer used before calibration saw any data")
        scale, zero = affine_params(self.lo, self.hi, self.bits)
        q = fake_quantize_affine(x.float(), scale, zero, self.bits).to(x.dtype)
        return torch.where(torch.isfinite(x), q, x)

    def extra_repr(self) -> str:
        return f"A{self.bits} {self.estimator} range=[{self.lo.item():.4g}, {self.hi.item():.4g}]"


class StaticQuantLinear(nn.Module):
    """Linear with a fake-quantized weight and static quantizers on its input and output."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, make_quantizer):
        super().__init__()
        self.register_buffer("weight", weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.input_quantizer = make_quantizer()
        self.output_quantizer = make_quantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(F.linear(self.input_quantizer(x), self.weight, self.bias))


class WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class OutputQuantized(nn.Module):
    """Any module (an embedding, a norm, an identity placeholder) whose output is quantized."""

    def __init__(self, module: nn.Module, quantizer: ActivationQuantizer):
        super().__init__()
        self.module, self.quantizer = module, quantizer

    def forward(self, *args, **kwargs):
        return self.quantizer(self.module(*args, **kwargs))


class AttentionQuantSites(nn.Module):
    """Attention hooks (qbench.modeling.hooks) with quantizers at Q K^T, the weights P and
    the context P V."""

    first_column_only = False

    def __init__(self, make_quantizer):
        super().__init__()
        self.scores_quantizer = make_quantizer()
        self.probs_quantizer = make_quantizer()
        self.context_quantizer = make_quantizer()

    def scores(self, x):
        return self.scores_quantizer(x)

    def probs(self, x):
        return self.probs_quantizer(x)

    def context(self, x):
        return self.context_quantizer(x)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def prepare_static(model: nn.Module, scheme) -> dict:
    """Swap modules and attach observers for the w8a8-pt family; returns the sites covered."""
    from qbench.modeling import families
    from qbench.modeling.model import attention_layers

    options = scheme.options

    def make_quantizer():
        return ActivationQuantizer(scheme.activation_bits, options.get("momentum", 0.9),
                                   options.get("activation_range", "minmax"), options.get("percentile", 99.99))

    sites = {"linear inputs/outputs": 0, "embeddings": 0, "norm outputs": 0, "residual sums": 0,
             "attention scores/probs/context": 0}
    head = model.get_output_embeddings()
    for name, linear in quantizable_linears(model, scheme.quantize_gates):
        weight = quantize_weight(linear.weight, scheme.weight_bits, scheme.weight_granularity,
                                 options.get("group_size"), True, options.get("weight_range", "minmax"))
        _set_submodule(model, name, StaticQuantLinear(linear, weight, make_quantizer))
        sites["linear inputs/outputs"] += 1
    residual_sums = set(families.residual_sums(model))  # identity placeholders (qbench models)
    for name, module in list(model.named_modules()):
        if module is head or isinstance(module, (ActivationQuantizer, OutputQuantized)):
            continue
        if isinstance(module, nn.Embedding):
            _set_submodule(model, name, OutputQuantized(module, make_quantizer()))
            sites["embeddings"] += 1
        elif _is_norm(module):
            _set_submodule(model, name, OutputQuantized(module, make_quantizer()))
            sites["norm outputs"] += 1
        elif name in residual_sums:
            _set_submodule(model, name, OutputQuantized(module, make_quantizer()))
            sites["residual sums"] += 1
    for _, module in attention_layers(model):  # ours, or stock HF ones through the registry
        module.qbench_hooks = AttentionQuantSites(make_quantizer)
        sites["attention scores/probs/context"] += 1
    return {"quantized_linears": sites["linear inputs/outputs"], "sites": sites}


def set_calibrating(model: nn.Module, calibrating: bool) -> int:
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    for q in quantizers:
        q.calibrating = calibrating
    return len(quantizers)


@torch.no_grad()
def calibrate_and_freeze(model: nn.Module, batches) -> dict:
    set_calibrating(model, True)
    n = 0
    for batch in batches:
        model(input_ids=batch)
        n += 1
    unobserved = [name for name, m in model.named_modules() if isinstance(m, ActivationQuantizer) and m.observed == 0]
    if unobserved:
        raise RuntimeError(f"{len(unobserved)} activation quantizers saw no calibration data, e.g. {unobserved[:3]}")
    count = set_calibrating(model, False)
    return {"calibration_batches": n, "activation_quantizers": count}
