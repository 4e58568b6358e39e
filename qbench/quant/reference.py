"""The reference backend: no quantization, the model in its compute dtype (fp32, bf16)."""
from __future__ import annotations

import torch

from qbench.quant.handlers import register, require

DTYPES = ("float32", "bfloat16", "float16")


def _check(scheme) -> None:
    require(scheme, scheme.dtype in DTYPES, f"dtype {scheme.dtype!r} is not one of {DTYPES}")


@register("backend", "reference", fields=("dtype",), check=_check, devices=("cpu", "cuda"))
def apply_reference(model: torch.nn.Module, scheme, calibration=None) -> dict:
    model.to(getattr(torch, scheme.dtype))
    return {"quantized_linears": 0}
