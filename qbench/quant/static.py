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

from qbench.quant.grid import WEIGHT_GRANULARITIES, WEIGHT_RANGES, affine_params, fake_quantize_affine, quantize_weight
from qbench.quant.handlers import CALIBRATION_OPTIONS, calibration_batches, register, require, require_options
from qbench.quant.surgery import quantizable_linears, set_submodule

ACTIVATION_RANGES = ("minmax", "percentile")


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
    from qbench.modeling.hooks import attention_layers

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
        set_submodule(model, name, StaticQuantLinear(linear, weight, make_quantizer))
        sites["linear inputs/outputs"] += 1
    residual_sums = set(families.residual_sums(model))  # identity placeholders (qbench models)
    for name, module in list(model.named_modules()):
        if module is head or isinstance(module, (ActivationQuantizer, OutputQuantized)):
            continue
        if isinstance(module, nn.Embedding):
            set_submodule(model, name, OutputQuantized(module, make_quantizer()))
            sites["embeddings"] += 1
        elif _is_norm(module):
            set_submodule(model, name, OutputQuantized(module, make_quantizer()))
            sites["norm outputs"] += 1
        elif name in residual_sums:
            set_submodule(model, name, OutputQuantized(module, make_quantizer()))
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


def _check(scheme) -> None:
    options = scheme.options
    for what, bits in (("weight_bits", scheme.weight_bits), ("activation_bits", scheme.activation_bits)):
        require(scheme, isinstance(bits, int) and 2 <= bits <= 8, f"{what} must be an int in 2..8, got {bits!r}")
    require(scheme, scheme.weight_granularity in WEIGHT_GRANULARITIES,
            f"weight_granularity {scheme.weight_granularity!r} is not one of {WEIGHT_GRANULARITIES}")
    require(scheme, (scheme.weight_granularity == "group") == ("group_size" in options),
            "options['group_size'] goes with weight_granularity 'group', and only with it")
    require(scheme, scheme.activation_static and scheme.activation_granularity == "per_tensor",
            "the static protocol quantizes activations statically per tensor: activation_static=True, "
            "activation_granularity='per_tensor'")
    require(scheme, options.get("weight_range", "minmax") in WEIGHT_RANGES,
            f"weight_range {options.get('weight_range')!r} is not one of {WEIGHT_RANGES}")
    estimator = options.get("activation_range", "minmax")
    require(scheme, estimator in ACTIVATION_RANGES, f"activation_range {estimator!r} is not one of {ACTIVATION_RANGES}")
    require(scheme, ("percentile" in options) == (estimator == "percentile"),
            "options['percentile'] goes with activation_range 'percentile', and only with it")
    require(scheme, 0.0 <= options.get("momentum", 0.9) < 1.0, f"momentum {options.get('momentum')!r} is not in [0, 1)")
    require_options(scheme, CALIBRATION_OPTIONS, "the static protocol (calibrated)")


@register("backend", "static", fields=("weight_bits", "weight_granularity", "activation_bits", "activation_granularity",
                                       "activation_static", "quantize_gates"),
          options=("momentum", "weight_range", "activation_range", "percentile", "group_size", *CALIBRATION_OPTIONS),
          check=_check, follow_device=True, devices=("cpu", "cuda"), requires=("attention",))
def apply_static(model: nn.Module, scheme, calibration=None) -> dict:
    """prepare, run the scheme's calibration draw, freeze."""
    from qbench.device import model_device

    if calibration is None:
        raise ValueError(f"scheme {scheme.name!r} is calibrated: pass calibration batches")
    device = model_device(model)
    facts = prepare_static(model, scheme)
    model.to(device)  # the new quantizers join the model's device before calibrating
    return {**facts, **calibrate_and_freeze(model, calibration_batches(scheme, calibration))}


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
