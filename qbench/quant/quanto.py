"""optimum-quanto backend: qint8 / qint4 / qfloat8 weights, optionally qint8 / qfloat8
activations calibrated on training batches.  quanto quantizes Linear inputs (and swaps
LayerNorms when activations are quantized); Q K^T, softmax and P V stay float."""
from __future__ import annotations

import torch
import torch.nn as nn

from qbench.quant.handlers import CALIBRATION_OPTIONS, calibration_batches, register, require, require_options
from qbench.quant.surgery import quantizable_linears

# quanto qtype -> the bits it stores; qint4 weights are quantized in groups of 128 (quanto's fixed size)
QTYPE_BITS = {"qint8": 8, "qint4": 4, "qfloat8": 8}
QINT4_GROUP = 128


def _import_quanto():
    try:
        import optimum.quanto as quanto
    except ImportError as err:
        raise ImportError("the quanto schemes need the `optimum-quanto` package: pip install optimum-quanto") from err
    return quanto


def _check(scheme) -> None:
    options = scheme.options
    weights, activations = options.get("weights"), options.get("activations")
    require(scheme, weights in QTYPE_BITS, f"quanto weights {weights!r} is not one of {list(QTYPE_BITS)}")
    require(scheme, scheme.weight_bits == QTYPE_BITS[weights], f"quanto {weights} weights are {QTYPE_BITS[weights]}-bit, "
            f"not weight_bits={scheme.weight_bits!r}")
    granularity = "group" if weights == "qint4" else "per_channel"
    require(scheme, scheme.weight_granularity == granularity, f"quanto quantizes {weights} weights {granularity}")
    require(scheme, options.get("group_size") == (QINT4_GROUP if weights == "qint4" else None),
            f"quanto's group size is {QINT4_GROUP} for qint4 weights and none otherwise")
    if activations is None:
        require(scheme, (scheme.activation_bits, scheme.activation_granularity, scheme.activation_static)
                == (None, None, False), "activations are not quantized (no options['activations'])")
        require(scheme, not CALIBRATION_OPTIONS & set(options), "nothing is calibrated without quantized activations")
        return
    require(scheme, activations in QTYPE_BITS and activations != "qint4",
            f"quanto activations {activations!r} is not qint8 or qfloat8")
    require(scheme, (scheme.activation_bits, scheme.activation_granularity, scheme.activation_static)
            == (8, "per_tensor", True), "quanto calibrates 8-bit static per-tensor activations: "
            "activation_bits=8, activation_granularity='per_tensor', activation_static=True")
    require_options(scheme, CALIBRATION_OPTIONS, "calibrated activations")


@register("backend", "quanto", fields=("weight_bits", "weight_granularity", "activation_bits", "activation_granularity",
                                       "activation_static", "quantize_gates"),
          options=("weights", "activations", "group_size", *CALIBRATION_OPTIONS), check=_check,
          devices=("cpu", "cuda"), package="optimum.quanto", slow=True)  # minutes per cell (recheck --slow)
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
        batches = calibration_batches(scheme, calibration)
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
