"""The weight-only backend: weights quantized by a registered weight method (round-to-nearest
here; GPTQ, AWQ, HQQ in their own modules), used in float (activations stay full precision).

A weight method is `options["method"]` of a weight-only scheme (default "rtn").  Each is
registered by its module (`@register_weight_method`) with what it reads and what it needs;
METHOD_MODULES names that module so a scheme can name the method before it is imported.  A
new weight method is one module plus its line in METHOD_MODULES."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qbench.quant.grid import WEIGHT_GRANULARITIES, WEIGHT_RANGES, quantize_weight
from qbench.quant.handlers import CALIBRATION_OPTIONS, calibration_batches, register, require
from qbench.quant.surgery import quantizable_linears, set_submodule
from qbench.suggest import closest

METHOD_MODULES = {"rtn": "qbench.quant.weight_only", "gptq": "qbench.quant.gptq", "awq": "qbench.quant.awq",
                  "hqq": "qbench.quant.hqq"}


@dataclass(frozen=True)
class WeightMethod:
    """weights(model, linears, scheme, calibration batches or None) -> (name -> weight, facts).
    options: the scheme options it reads besides "method" (calibrated: the calibration draw's
    too); check(scheme) raises ValueError on values it cannot honour; family: what the
    report and the study call it; slow: minutes per cell (recheck samples it only on request);
    package: what it needs beyond torch."""
    name: str
    weights: Callable
    options: frozenset
    calibrated: bool = False
    check: Callable | None = None
    family: str = ""
    slow: bool = False
    package: str | None = None


WEIGHT_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(name: str, *, options: Iterable[str] = (), calibrated: bool = False,
                           check: Callable | None = None, family: str = "", slow: bool = False,
                           package: str | None = None):
    """Decorator: register `weights` as the weight method `name`."""
    def decorate(weights: Callable) -> Callable:
        if name in WEIGHT_METHODS:
            raise ValueError(f"weight method {name!r} is registered twice")
        reads = frozenset(options) | (CALIBRATION_OPTIONS if calibrated else frozenset())
        WEIGHT_METHODS[name] = WeightMethod(name, weights, reads, calibrated, check, family or name, slow, package)
        return weights
    return decorate


def get_weight_method(name) -> WeightMethod:
    """The registered weight method, importing its module first if need be."""
    if name not in WEIGHT_METHODS and name in METHOD_MODULES:
        importlib.import_module(METHOD_MODULES[name])
    if name not in WEIGHT_METHODS:
        known = set(METHOD_MODULES) | set(WEIGHT_METHODS)
        raise ValueError(f"unknown weight method {name!r}{closest(str(name), known)}")
    return WEIGHT_METHODS[name]


def scheme_method(scheme) -> WeightMethod:
    return get_weight_method(scheme.options.get("method", "rtn"))


class WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def grouped_asymmetric(scheme) -> None:
    """The check of the methods that fit asymmetric grids per group (GPTQ, AWQ, HQQ)."""
    method = scheme.options.get("method")
    require(scheme, scheme.weight_granularity == "group", f"{method} quantizes weights in groups")
    require(scheme, scheme.options.get("symmetric", False) is False, f"{method} fits asymmetric grids: symmetric=False")


def _check_rtn(scheme) -> None:
    require(scheme, scheme.options.get("weight_range", "minmax") in WEIGHT_RANGES,
            f"weight_range {scheme.options.get('weight_range')!r} is not one of {WEIGHT_RANGES}")


@register_weight_method("rtn", options=("group_size", "symmetric", "weight_range"), check=_check_rtn,
                        family="round-to-nearest")
def rtn_weights(model, linears, scheme, batches) -> tuple[dict, dict]:
    options = scheme.options
    return {name: quantize_weight(linear.weight, scheme.weight_bits, scheme.weight_granularity,
                                  options.get("group_size"), options.get("symmetric", False),
                                  options.get("weight_range", "minmax")) for name, linear in linears}, {}


def _check(scheme) -> None:
    options = scheme.options
    method = scheme_method(scheme)  # its options are checked by check_scheme (the handler's `options`)
    require(scheme, isinstance(scheme.weight_bits, int) and 2 <= scheme.weight_bits <= 8,
            f"weight_bits must be an int in 2..8, got {scheme.weight_bits!r}")
    require(scheme, scheme.weight_granularity in WEIGHT_GRANULARITIES,
            f"weight_granularity {scheme.weight_granularity!r} is not one of {WEIGHT_GRANULARITIES}")
    require(scheme, (scheme.weight_granularity == "group") == ("group_size" in options),
            "options['group_size'] goes with weight_granularity 'group', and only with it")
    if method.calibrated:
        missing = sorted(CALIBRATION_OPTIONS - set(options))
        require(scheme, not missing, f"{method.name} is calibrated: it needs option(s) {missing}")
    if method.check is not None:
        method.check(scheme)


def _reads(scheme) -> frozenset:
    try:
        return scheme_method(scheme).options | {"method"}
    except ValueError:
        return frozenset({"method"})  # an unknown method: _check names it


@register("backend", "weight_only", fields=("weight_bits", "weight_granularity", "quantize_gates"),
          options=_reads, check=_check, follow_device=True,
          devices=("cpu", "cuda"),  # RTN, GPTQ, AWQ in torch; HQQ's fit runs on the CPU
          package=lambda scheme: scheme_method(scheme).package,
          family=lambda scheme: scheme_method(scheme).family, slow=lambda scheme: scheme_method(scheme).slow)
def prepare_weight_only(model: nn.Module, scheme, calibration=None) -> dict:
    """Weight-only schemes: the weights of every quantizable linear by the scheme's method."""
    options = scheme.options
    method = scheme_method(scheme)
    linears = quantizable_linears(model, scheme.quantize_gates)
    group = options.get("group_size") if scheme.weight_granularity == "group" else None
    misfits = [f"{name} ({linear.in_features})" for name, linear in linears if group and linear.in_features % group]
    if misfits:  # before any calibration work
        raise ValueError(f"scheme {scheme.name!r}: groups of {group} do not divide the input width of "
                         f"{len(misfits)} linear(s), e.g. {misfits[0]}; use a group size that divides it")
    batches = calibration_batches(scheme, calibration) if method.calibrated else None
    facts = {"quantized_linears": len(linears), "sites": ["linear weights"]}
    if method.name != "rtn":
        facts["weight_method"] = method.name
    weights, method_facts = method.weights(model, linears, scheme, batches)
    facts.update(method_facts)
    for name, linear in linears:
        set_submodule(model, name, WeightOnlyLinear(linear, weights[name]))
    return facts
