"""optimum-quanto backend: qint8 / qint4 / qfloat8 weights, optionally qint8 / qfloat8
activations calibrated on training batches.  quanto quantizes Linear inputs (and swaps
LayerNorms when activations are quantized); Q K^T, softmax and P V stay float."""
from __future__ import annotations

import torch
import torch.nn as nn

from qbench.quant.simulated import quantizable_linears


def _import_quanto():
    try:
        import optimum.quanto as quanto
    except ImportError as err:
        raise ImportError("the quanto schemes need the `optimum-quanto` package: pip install optimum-quanto") from err
    return quanto


def apply_quanto(model: nn.Module, scheme, calibration=None) -> dict:
    quanto = _import_quanto()
    options = scheme.options
    dtypes = {"qint8": quanto.qint8, "qint4": quanto.qint4, "qfloat8": quanto.qfloat8}
    weights = dtypes[options["weights"]]
    activations = dtypes[options["activations"]] if options.get("activations") else None
    keep = {name for name, _ in quantizable_linears(model, scheme.quantize_gates)}
    exclude = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in keep]
    quanto.quantize(model, weights=weights, activations=activations, exclude=exclude or None)
    facts = {}
    if activations is not None:
        if calibration is None:
            raise ValueError(f"scheme {scheme.name!r} quantizes activations: pass calibration batches")
        batches = calibration(options["calibration_batches"], options["calibration_seed"],
                              options["calibration_batch_size"])
        with torch.no_grad(), quanto.Calibration():
            for batch in batches:
                model(input_ids=batch)
        facts["calibration_batches"] = len(batches)
    quanto.freeze(model)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "QLinear"]
    if len(quantized) != len(keep):  # quanto silently skips what it cannot handle (GPT-2's Conv1D)
        raise NotImplementedError(f"quanto quantized {len(quantized)} of {len(keep)} linear layers; "
                                  "the rest are not nn.Linear (e.g. GPT-2 Conv1D)")
    return {**facts, "quantized_linears": len(quantized),
            "quantized_norms": sum(type(m).__name__ == "QLayerNorm" for m in model.modules())}
