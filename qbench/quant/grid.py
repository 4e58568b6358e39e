"""Uniform quantization grids shared by the static, weight-only, GPTQ and AWQ paths:
x_hat = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z) (asymmetric) or s * clamp(round(x / s),
-(2^(b-1) - 1), 2^(b-1) - 1) (symmetric), with ranges by min-max or an MSE clipping search."""
from __future__ import annotations

import torch

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "group")
WEIGHT_RANGES = ("minmax", "mse")


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
        raise ValueError(f"unknown weight granularity {granularity!r}; one of {WEIGHT_GRANULARITIES}")
    if range_method not in WEIGHT_RANGES:
        raise ValueError(f"unknown weight range method {range_method!r}; one of {WEIGHT_RANGES}")
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
