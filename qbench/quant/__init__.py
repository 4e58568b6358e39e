"""quantize(model, scheme, calibration): dispatch a scheme to its backend."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from qbench.quant.scheme import SCHEMES, Scheme, get_scheme

# calibration(n_batches, seed, batch_size) -> iterable of (B, T) token batches from the
# training split of the model's corpus.
CalibrationSource = Callable[[int, int, int], Iterable[torch.Tensor]]


def linearize_conv1d(model: torch.nn.Module) -> int:
    """Replace GPT-2-style Conv1D layers (x @ W + b, W of shape (in, out)) by the equivalent
    nn.Linear, so every backend sees them (quanto, for one, silently skips Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    from qbench.quant.simulated import _set_submodule

    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in convs:
        linear = torch.nn.Linear(conv.weight.shape[0], conv.nf, device=conv.weight.device)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        _set_submodule(model, name, linear)
    return len(convs)


def quantize(model: torch.nn.Module, scheme: Scheme | str, calibration: CalibrationSource | None = None) -> dict:
    """Quantize `model` in place; returns facts about what was done (recorded with results)."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    model.eval()
    linearize_conv1d(model)
    from qbench.device import model_device

    device = model_device(model)
    facts = _quantize(model, scheme, calibration)
    if scheme.backend in ("simulated", "static", "weight_only"):
        model.to(device)  # quantizer state created on the CPU follows the model
    return facts


def calibration_batches(scheme: Scheme, calibration: CalibrationSource | None) -> list[torch.Tensor]:
    """The scheme's calibration draw (its seed, batch count and batch size)."""
    if calibration is None:
        raise ValueError(f"scheme {scheme.name!r} is calibrated: pass calibration batches")
    o = scheme.options
    return list(calibration(o["calibration_batches"], o["calibration_seed"], o["calibration_batch_size"]))


def apply_transform(model: torch.nn.Module, scheme: Scheme, calibration: CalibrationSource | None) -> dict:
    """Equivalence-preserving float transforms applied before the quantizers (SmoothQuant,
    residual rotation); {} when the scheme has none."""
    transform = scheme.options.get("transform")
    if not transform:
        return {}
    method = transform["method"]
    if method == "smoothquant":
        from qbench.quant.smoothquant import smooth

        batches = calibration_batches(scheme, calibration)
        facts = smooth(model, batches, transform.get("alpha", 0.5))
        return {**facts, "transform_calibration_tokens": sum(b.numel() for b in batches)}
    if method == "hadamard":
        from qbench.quant.rotation import rotate

        # the draw seed seeds the Hadamard signs: --calibration-seeds gives independent rotations
        return rotate(model, seed=scheme.options.get("calibration_seed", 0))
    raise NotImplementedError(f"scheme {scheme.name!r}: unknown transform {method!r}")


def _quantize(model: torch.nn.Module, scheme: Scheme, calibration: CalibrationSource | None) -> dict:
    facts = apply_transform(model, scheme, calibration)
    facts = {**facts, **_quantize_base(model, scheme, calibration)}
    kv_spec = scheme.kv_cache()
    if kv_spec is not None:  # keys and values as they enter the cache, after any weight/activation scheme
        from qbench.quant.kvcache import install_kv_cache

        facts.update(install_kv_cache(model, kv_spec))
    return facts


def _quantize_base(model: torch.nn.Module, scheme: Scheme, calibration: CalibrationSource | None) -> dict:
    if scheme.backend == "reference":
        model.to(getattr(torch, scheme.dtype))
        return {"quantized_linears": 0}
    if scheme.backend == "simulated":
        from qbench.quant.simulated import apply_dynamic

        facts = apply_dynamic(model, scheme)
        kernel_options = scheme.options.get("attention_kernel")
        if kernel_options:
            from qbench.quant.lowbit_attention import LowBitAttention, install_kernel

            facts["lowbit_attention_modules"] = install_kernel(model, LowBitAttention(**kernel_options))
        return facts
    if scheme.backend == "weight_only":
        from qbench.quant.weight_only import prepare_weight_only

        batches = calibration_batches(scheme, calibration) if "calibration_batches" in scheme.options else None
        return prepare_weight_only(model, scheme, batches)
    if scheme.backend == "static":
        from qbench.quant.static import calibrate_and_freeze, prepare_static

        if calibration is None:
            raise ValueError(f"scheme {scheme.name!r} is calibrated: pass calibration batches")
        facts = prepare_static(model, scheme)
        from qbench.device import model_device

        model.to(model_device(model))  # the new quantizers join the model's device before calibrating
        options = scheme.options
        batches = calibration(options["calibration_batches"], options["calibration_seed"],
                              options["calibration_batch_size"])
        return {**facts, **calibrate_and_freeze(model, batches)}
    if scheme.backend == "bitsandbytes":
        from qbench.quant.bnb import apply_bitsandbytes

        return apply_bitsandbytes(model, scheme)
    if scheme.backend == "quanto":
        from qbench.quant.quanto import apply_quanto

        return apply_quanto(model, scheme, calibration)
    raise NotImplementedError(f"scheme {scheme.name!r}: backend {scheme.backend!r} has no implementation")


__all__ = ["SCHEMES", "CalibrationSource", "Scheme", "get_scheme", "quantize"]
