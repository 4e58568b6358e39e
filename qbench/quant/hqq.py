"""HQQ (Badri & Shaji 2023): calibration-free 4-bit weights whose zero points are fitted by
half-quadratic optimisation of an l_p (p < 1) reconstruction error.  The `hqq` library's
quantizer does the work (its defaults for 4 bits: optimize, rounded zero points, axis 1);
the dequantized weight is used in float like every weight-only scheme here."""
from __future__ import annotations

import torch

from qbench.quant.weight_only import grouped_asymmetric, register_weight_method


def hqq_weight(weight: torch.Tensor, bits: int = 4, group_size: int = 64) -> torch.Tensor:
    try:
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except ImportError as err:
        raise ImportError("the HQQ scheme uses the hqq package: pip install 'hqq==0.2.8'") from err
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
    w = weight.detach().float().cpu()
    codes, meta = Quantizer.quantize(w, device="cpu", compute_dtype=torch.float32, **config)
    return Quantizer.dequantize(codes, meta).reshape(w.shape).to(weight.dtype).to(weight.device)


@register_weight_method("hqq", options=("group_size",), check=grouped_asymmetric, family="HQQ", slow=True,
                        package="hqq")
def hqq_scheme_weights(model, linears, scheme, batches) -> tuple[dict, dict]:
    return {name: hqq_weight(linear.weight, scheme.weight_bits, scheme.options["group_size"])
            for name, linear in linears}, {}
