"""The weight-only backend: round-to-nearest, GPTQ and AWQ (calibrated), HQQ weights, used
in float (activations stay full precision)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qbench.quant.grid import WEIGHT_GRANULARITIES, WEIGHT_RANGES, quantize_weight
from qbench.quant.handlers import CALIBRATION_OPTIONS, calibration_batches, read_by_others, register, require
from qbench.quant.surgery import quantizable_linears, set_submodule

# the options each weight method reads (besides "method"); group_size with granularity "group"
METHOD_OPTIONS = {
    "rtn": {"group_size", "symmetric", "weight_range"},
    "gptq": {"group_size", "symmetric", "percdamp", *CALIBRATION_OPTIONS},
    "awq": {"group_size", "symmetric", "grid", *CALIBRATION_OPTIONS},
    "hqq": {"group_size"},
}
CALIBRATED = ("gptq", "awq")
# GPTQ's lazy batch width: how many columns are updated at once, the same result for any width
# (exact in float64), so a speed knob and not part of the scheme
GPTQ_BLOCK = 128


class WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _rtn(model, linears, scheme, batches) -> tuple[dict, dict]:
    options = scheme.options
    return {name: quantize_weight(linear.weight, scheme.weight_bits, scheme.weight_granularity,
                                  options.get("group_size"), options.get("symmetric", False),
                                  options.get("weight_range", "minmax")) for name, linear in linears}, {}


def _gptq(model, linears, scheme, batches) -> tuple[dict, dict]:
    from qbench.quant.gptq import collect_hessians, gptq_quantize

    hessians, tokens = collect_hessians(model, linears, batches)
    return {name: gptq_quantize(linear.weight, hessians.pop(name), scheme.weight_bits, scheme.options["group_size"],
                                GPTQ_BLOCK, scheme.options.get("percdamp", 0.01))
            for name, linear in linears}, {"calibration_tokens": tokens}


def _awq(model, linears, scheme, batches) -> tuple[dict, dict]:
    from qbench.quant.awq import awq_weights

    weights, tokens = awq_weights(model, linears, batches, scheme.weight_bits, scheme.options["group_size"],
                                  scheme.options.get("grid", 20))
    return weights, {"calibration_tokens": tokens}


def _hqq(model, linears, scheme, batches) -> tuple[dict, dict]:
    from qbench.quant.hqq import hqq_weight

    return {name: hqq_weight(linear.weight, scheme.weight_bits, scheme.options["group_size"])
            for name, linear in linears}, {}


# method -> (model, linears, scheme, calibration batches or None) -> (name -> weight, facts)
WEIGHT_METHODS = {"rtn": _rtn, "gptq": _gptq, "awq": _awq, "hqq": _hqq}


def _check(scheme) -> None:
    options = scheme.options
    method = options.get("method", "rtn")
    require(scheme, method in METHOD_OPTIONS, f"weight method {method!r} is not one of {sorted(METHOD_OPTIONS)}")
    unread = sorted(set(options) - METHOD_OPTIONS[method] - {"method"} - read_by_others(scheme))
    require(scheme, not unread, f"weight method {method!r} does not read option(s) {unread}")
    require(scheme, isinstance(scheme.weight_bits, int) and 2 <= scheme.weight_bits <= 8,
            f"weight_bits must be an int in 2..8, got {scheme.weight_bits!r}")
    require(scheme, scheme.weight_granularity in WEIGHT_GRANULARITIES,
            f"weight_granularity {scheme.weight_granularity!r} is not one of {WEIGHT_GRANULARITIES}")
    require(scheme, (scheme.weight_granularity == "group") == ("group_size" in options),
            "options['group_size'] goes with weight_granularity 'group', and only with it")
    if method != "rtn":  # GPTQ, AWQ and HQQ fit asymmetric grids per group
        require(scheme, scheme.weight_granularity == "group", f"{method} quantizes weights in groups")
        require(scheme, options.get("symmetric", False) is False, f"{method} fits asymmetric grids: symmetric=False")
    if method == "gptq":  # its lazy batches (GPTQ_BLOCK columns) hold whole groups
        group = options.get("group_size")
        require(scheme, isinstance(group, int) and GPTQ_BLOCK % group == 0,
                f"GPTQ's group_size {group!r} must divide its lazy-batch width {GPTQ_BLOCK}")
    if method in CALIBRATED:
        missing = sorted(CALIBRATION_OPTIONS - set(options))
        require(scheme, not missing, f"{method} is calibrated: it needs option(s) {missing}")
    require(scheme, options.get("weight_range", "minmax") in WEIGHT_RANGES,
            f"weight_range {options.get('weight_range')!r} is not one of {WEIGHT_RANGES}")


@register("backend", "weight_only", fields=("weight_bits", "weight_granularity", "quantize_gates"),
          options=set().union(*METHOD_OPTIONS.values()) | {"method"}, check=_check, follow_device=True,
          devices=("cpu", "cuda"),  # RTN, GPTQ, AWQ in torch; HQQ's fit runs on the CPU
          package=lambda scheme: "hqq" if scheme.options.get("method") == "hqq" else None)
def prepare_weight_only(model: nn.Module, scheme, calibration=None) -> dict:
    """Weight-only schemes: round-to-nearest, or GPTQ / AWQ (calibrated) / HQQ weights."""
    options = scheme.options
    method = options.get("method", "rtn")
    linears = quantizable_linears(model, scheme.quantize_gates)
    group = options.get("group_size") if scheme.weight_granularity == "group" else None
    misfits = [f"{name} ({linear.in_features})" for name, linear in linears if group and linear.in_features % group]
    if misfits:  # before any calibration work
        raise ValueError(f"scheme {scheme.name!r}: groups of {group} do not divide the input width of "
                         f"{len(misfits)} linear(s), e.g. {misfits[0]}; use a group size that divides it")
    batches = calibration_batches(scheme, calibration) if method in CALIBRATED else None
    facts = {"quantized_linears": len(linears), "sites": ["linear weights"]}
    if method != "rtn":
        facts["weight_method"] = method
    weights, method_facts = WEIGHT_METHODS[method](model, linears, scheme, batches)
    facts.update(method_facts)
    for name, linear in linears:
        set_submodule(model, name, WeightOnlyLinear(linear, weights[name]))
    return facts
