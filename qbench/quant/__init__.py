"""quantize(model, scheme, calibration): run a scheme's registered handlers (qbench.quant.handlers):
its transform, its backend, its add-ons, in that order."""
from __future__ import annotations

import torch

from qbench.quant.handlers import CalibrationSource, scheme_handlers
from qbench.quant.scheme import SCHEMES, Scheme, get_scheme
from qbench.quant.surgery import linearize_conv1d


def quantize(model: torch.nn.Module, scheme: Scheme | str, calibration: CalibrationSource | None = None) -> dict:
    """Quantize `model` in place; returns facts about what was done (recorded with results)."""
    from qbench.device import model_device

    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    model.eval()
    linearize_conv1d(model)
    device = model_device(model)
    facts = {}
    handlers = scheme_handlers(scheme)
    for handler in handlers:  # transform, backend, add-ons
        facts.update(handler.apply(model, scheme, calibration))
    if any(h.follow_device for h in handlers):
        model.to(device)  # quantizer state created on the CPU follows the model
    return facts


__all__ = ["SCHEMES", "CalibrationSource", "Scheme", "get_scheme", "linearize_conv1d", "quantize"]
