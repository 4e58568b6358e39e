"""Weight-only schemes: round-to-nearest, GPTQ and AWQ (calibrated), HQQ."""
from __future__ import annotations

import torch.nn as nn

from qbench.quant.simulated import _set_submodule, quantizable_linears
from qbench.quant.static import WeightOnlyLinear, quantize_weight


def _need(scheme, batches):
    if batches is None:
        raise ValueError(f"scheme {scheme.name!r} is calibrated: pass calibration batches")
    return batches


def prepare_weight_only(model: nn.Module, scheme, batches: list | None = None) -> dict:
    """Weight-only schemes: round-to-nearest, or GPTQ / AWQ (calibrated) / HQQ weights."""
    options = scheme.options
    method = options.get("method", "rtn")
    linears = quantizable_linears(model, scheme.quantize_gates)
    group = options.get("group_size") if scheme.weight_granularity == "group" else None
    misfits = [f"{name} ({linear.in_features})" for name, linear in linears if group and linear.in_features % group]
    if misfits:  # before any calibration work
        raise ValueError(f"scheme {scheme.name!r}: groups of {group} do not divide the input width of "
                         f"{len(misfits)} linear(s), e.g. {misfits[0]}; use a group size that divides it")
    facts = {"quantized_linears": len(linears), "sites": ["linear weights"]}
    if method != "rtn":
        facts["weight_method"] = method
    if method == "gptq":
        from qbench.quant.gptq import collect_hessians, gptq_quantize

        hessians, facts["calibration_tokens"] = collect_hessians(model, linears, _need(scheme, batches))
        weights = {name: gptq_quantize(linear.weight, hessians.pop(name), scheme.weight_bits,
                                       options["group_size"], options.get("block_size", 128),
                                       options.get("percdamp", 0.01)) for name, linear in linears}
    elif method == "awq":
        from qbench.quant.awq import awq_weights

        weights, facts["calibration_tokens"] = awq_weights(model, linears, _need(scheme, batches),
                                                           scheme.weight_bits, options["group_size"],
                                                           options.get("grid", 20))
    elif method == "hqq":
        from qbench.quant.hqq import hqq_weight

        weights = {name: hqq_weight(linear.weight, scheme.weight_bits, options["group_size"])
                   for name, linear in linears}
    elif method == "rtn":
        weights = {name: quantize_weight(linear.weight, scheme.weight_bits, scheme.weight_granularity,
                                         options.get("group_size"), options.get("symmetric", False),
                                         options.get("weight_range", "minmax")) for name, linear in linears}
    else:
        raise NotImplementedError(f"scheme {scheme.name!r}: unknown weight method {method!r}")
    for name, linear in linears:
        _set_submodule(model, name, WeightOnlyLinear(linear, weights[name]))
    return facts
