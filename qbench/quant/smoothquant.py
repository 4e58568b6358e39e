"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

For a norm and the linears reading its output, with per-channel calibration maxima
a_j = max|X_j| and weight maxima w_j = max over the (non-gate) readers of max_i |W_ij|,

    s_j = max(a_j^alpha / w_j^(1 - alpha), 1e-5)                       (the released smooth_ln_fcs)

and the norm's scale (its weight; Gemma's 1 + w) and bias are divided by s while every reader's input columns are
multiplied by s: in float the model is unchanged; the norm output, which the quantizers
see, has its outlier channels shrunk.  Gates are rescaled to stay equal but are not part
of w_j (they stay in full precision).

Why not a library: torchao's prototype smooths each linear separately with a runtime
division of its input, so the norm output quantized by the w8a8-pt protocol keeps its
outliers; the scales must be folded into the shared norm as in the paper's released code.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qbench.quant.handlers import CALIBRATION_OPTIONS, calibration_batches, register, require, require_options
from qbench.quant.structure import is_gate, residual_structure


def activation_maxima(model: nn.Module, norms: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """Per-channel max |output| of each named norm over the calibration batches."""
    from qbench.quant.observe import observe

    maxima: dict[str, torch.Tensor] = {}

    def keep_max(name, x):
        m = x.abs().amax(dim=0).float()
        maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)

    if observe(model, norms.items(), keep_max, batches, what="output") == 0:
        raise ValueError("SmoothQuant needs calibration batches")
    return maxima


def smoothing_scales(act_max: torch.Tensor, readers: list[nn.Module], alpha: float) -> torch.Tensor:
    weights = [r.weight.detach().abs().float() for r in readers if not is_gate(r)]
    w_max = torch.stack([w.amax(dim=0) for w in weights]).amax(dim=0).clamp_min(1e-5)
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def scale_reader_inputs(reader: nn.Module, scales: torch.Tensor) -> None:
    """reader(x) == reader'(x / scales): multiply its input columns by `scales`."""
    from qbench.modeling.model import HeadwiseGate

    if isinstance(reader, HeadwiseGate):  # weight (H, D, out) reads channel h * D + d
        h, d, _ = reader.weight.shape
        reader.weight.mul_(scales.view(h, d, 1).to(reader.weight.dtype))
    else:
        reader.weight.mul_(scales.view(1, -1).to(reader.weight.dtype))


@torch.no_grad()
def smooth(model: nn.Module, batches, alpha: float = 0.5) -> dict:
    """Fold SmoothQuant scales into every norm -> readers group of `model` (in place)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    structure = residual_structure(model, "smoothquant")
    maxima = activation_maxima(model, {g.name: g.norm for g in structure.groups}, batches)
    largest, smoothed = [], []
    for group in structure.groups:
        scales = smoothing_scales(maxima[group.name], [r for _, r in group.readers], alpha)
        smoothed.append(float((maxima[group.name].float() / scales).max()))
        # the norm's scale (Gemma's 1 + w, else w) divided by s
        structure.set_scale(group.norm, structure.scale(group.norm) / scales.to(group.norm.weight.dtype))
        if getattr(group.norm, "bias", None) is not None:
            group.norm.bias.div_(scales.to(group.norm.bias.dtype))
        for _, reader in group.readers:
            scale_reader_inputs(reader, scales)
        largest.append(float(maxima[group.name].max()))
    return {"transform": "smoothquant", "alpha": alpha, "smoothed_norms": len(structure.groups),
            "largest_norm_output_before": round(max(largest), 4),
            "largest_norm_output_after": round(max(smoothed), 4)}  # on the calibration draw


def _check(scheme) -> None:
    alpha = scheme.options["transform"].get("alpha", 0.5)
    require(scheme, isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0, f"SmoothQuant alpha {alpha!r} is not in [0, 1]")
    require_options(scheme, CALIBRATION_OPTIONS, "SmoothQuant (calibrated)")


@register("transform", "smoothquant", options=CALIBRATION_OPTIONS, transform_keys=("method", "alpha"), check=_check,
          devices=("cpu", "cuda"), requires=("smoothquant",))
def apply_smoothquant(model: nn.Module, scheme, calibration=None) -> dict:
    batches = calibration_batches(scheme, calibration)
    facts = smooth(model, batches, scheme.options["transform"].get("alpha", 0.5))
    return {**facts, "transform_calibration_tokens": sum(b.numel() for b in batches)}
