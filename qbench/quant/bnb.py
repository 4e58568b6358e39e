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

from qbench.quant.simulated import _set_submodule, quantizable_linears


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


def four_bit_linear(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _import_bnb()
    if linear.in_features % 64:
        raise ValueError(f"bitsandbytes 4-bit on CPU needs in_features divisible by 64, got {linear.in_features}")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=False)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().float().clone(), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=False, blocksize=64)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to(linear.weight.device).eval()


def apply_bitsandbytes(model: nn.Module, scheme) -> dict:
    options = scheme.options
    linears = quantizable_linears(model, scheme.quantize_gates)
    for name, linear in linears:
        if options["method"] == "int8":
            layer = int8_linear(linear, options["threshold"])
        else:
            layer = four_bit_linear(linear, options["quant_type"], getattr(torch, options.get("compute_dtype", "float32")))
        _set_submodule(model, name, layer)
    model.eval()
    return {"quantized_linears": len(linears)}
