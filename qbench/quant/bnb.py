"""bitsandbytes backend: LLM.int8 (vector-wise int8 with fp16 outlier decomposition above
a threshold) and 4-bit NF4 / FP4 weights, by a module swap that runs on CPU.

bitsandbytes is imported lazily: without it, these schemes fail with a message naming the
package and qbench itself still imports.  Its int8 layers must run in eval mode (in
training mode they skip activation quantization).
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from qbench.quant.handlers import read_by_others, register, require
from qbench.quant.surgery import quantizable_linears, set_submodule

# method -> (weight_bits, weight_granularity, activation_bits, activation_granularity) it computes
METHOD_FIELDS = {"int8": (8, "per_channel", 8, "per_token"), "4bit": (4, "group", None, None)}
METHOD_OPTIONS = {"int8": {"threshold"}, "4bit": {"quant_type", "compute_dtype", "group_size"}}
QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes' packed CPU GEMM computes in the input's dtype whatever compute_dtype says:
# only float32 (the input's dtype here) is what runs
COMPUTE_DTYPES = ("float32",)
CPU_BLOCKSIZE = 64
CPU_ROW_PACK = 32  # its CPU GEMM packs the weight's rows in blocks of 32 (an assert deep inside otherwise)


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError("the bitsandbytes schemes need the `bitsandbytes` package: pip install bitsandbytes") from err
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    return bitsandbytes


def int8_linear(linear: nn.Linear, threshold: float) -> nn.Module:
    bnb = _import_bnb()
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().float().clone(), requires_grad=False,
                                     has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to(linear.weight.device).eval()  # .to() quantizes the weight


def four_bit_linear(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype, blocksize: int = 64) -> nn.Module:
    bnb = _import_bnb()
    if linear.in_features % blocksize:
        raise ValueError(f"bitsandbytes 4-bit on CPU needs in_features divisible by its block size {blocksize}, "
                         f"got {linear.in_features}")
    if linear.weight.device.type == "cpu" and linear.out_features % CPU_ROW_PACK:
        raise ValueError(f"bitsandbytes 4-bit on CPU packs output rows by {CPU_ROW_PACK}: out_features "
                         f"{linear.out_features} is not a multiple (a headwise gate? leave quantize_gates off)")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=False)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().float().clone(), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=False, blocksize=blocksize)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to(linear.weight.device).eval()


def _check(scheme) -> None:
    options = scheme.options
    method = options.get("method")
    require(scheme, method in METHOD_FIELDS, f"bitsandbytes method {method!r} is not one of {list(METHOD_FIELDS)}")
    fields = (scheme.weight_bits, scheme.weight_granularity, scheme.activation_bits, scheme.activation_granularity)
    require(scheme, fields == METHOD_FIELDS[method],
            f"bitsandbytes {method} computes (weight_bits, weight_granularity, activation_bits, "
            f"activation_granularity) = {METHOD_FIELDS[method]}, not {fields}")
    wrong = sorted(set(options) - METHOD_OPTIONS[method] - {"method"} - read_by_others(scheme))
    require(scheme, not wrong, f"bitsandbytes {method} does not read option(s) {wrong}")
    missing = sorted(METHOD_OPTIONS[method] - set(options) - {"compute_dtype"})
    require(scheme, not missing, f"bitsandbytes {method} needs option(s) {missing}")
    if method == "4bit":
        require(scheme, options["quant_type"] in QUANT_TYPES, f"quant_type {options['quant_type']!r} not in {QUANT_TYPES}")
        require(scheme, options.get("compute_dtype", "float32") in COMPUTE_DTYPES,
                f"compute_dtype {options.get('compute_dtype')!r} not in {COMPUTE_DTYPES}")
        require(scheme, options["group_size"] == CPU_BLOCKSIZE,
                f"bitsandbytes 4-bit runs blocks of {CPU_BLOCKSIZE} on CPU (other sizes fail in its CPU GEMM), "
                f"not {options['group_size']!r}")


@register("backend", "bitsandbytes", fields=("weight_bits", "weight_granularity", "activation_bits",
                                             "activation_granularity", "quantize_gates"),
          options=("method", *set().union(*METHOD_OPTIONS.values())), check=_check,
          devices=("cpu", "cuda"), package="bitsandbytes")
def apply_bitsandbytes(model: nn.Module, scheme, calibration=None) -> dict:
    options = scheme.options
    linears = quantizable_linears(model, scheme.quantize_gates)
    for name, linear in linears:
        if options["method"] == "int8":
            layer = int8_linear(linear, options["threshold"])
        else:
            layer = four_bit_linear(linear, options["quant_type"], getattr(torch, options.get("compute_dtype", "float32")),
                                    options["group_size"])
        set_submodule(model, name, layer)
    model.eval()
    return {"quantized_linears": len(linears)}
