"""quantize(model, scheme): dispatch a scheme to its backend."""
from __future__ import annotations

import torch

from qbench.quant.scheme import SCHEMES, Scheme, get_scheme


def quantize(model: torch.nn.Module, scheme: Scheme | str) -> dict:
    """Quantize `model` in place; returns facts about what was done (recorded with results)."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    model.eval()
    if scheme.backend == "reference":
        model.to(getattr(torch, scheme.dtype))
        return {"quantized_linears": 0}
    if scheme.backend == "simulated" and scheme.activation_granularity == "per_token":
        from qbench.quant.simulated import apply_dynamic

        return apply_dynamic(model, scheme)
    raise NotImplementedError(f"scheme {scheme.name!r}: backend {scheme.backend!r} with "
                              f"{scheme.activation_granularity} activations has no implementation")


__all__ = ["SCHEMES", "Scheme", "get_scheme", "quantize"]
