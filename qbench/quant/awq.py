"""AWQ (Lin et al. 2024): activation-aware scaling before 4-bit weight quantization.

Per linear, with s_X the mean |x| per input channel over the calibration tokens, the
scales s = s_X^r / sqrt(max * min) for r on a 20-point grid in [0, 1) are tried and the
one minimising || X W^T - (X / s) Q(W s)^T ||^2 is kept; the weight used is then
Q(W s) / s (in float the same as dividing the input by s, as AWQ's folded form does).

The search is torchao's (`torchao.prototype.awq.core.AWQObserver`, the paper's grid and
loss, per linear); torchao's own int4 kernels need CUDA, so its base config is replaced by
qbench's group-wise RTN grid, registered as a torchao config handler.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from qbench.quant.grid import quantize_weight
from qbench.quant.observe import observe
from qbench.quant.weight_only import grouped_asymmetric, register_weight_method


def _torchao():
    try:
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)
        from torchao.core.config import AOBaseConfig
        from torchao.prototype.awq.core import AWQObserver
        from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER
        from torchao.utils import DummyModule
    except ImportError as err:
        raise ImportError("the AWQ scheme uses torchao's AWQ search: pip install 'torchao==0.18.0'") from err
    return AOBaseConfig, AWQObserver, _QUANTIZE_CONFIG_HANDLER, DummyModule


_CONFIG = None


def rtn_config(bits: int, group_size: int):
    """A torchao config whose handler fake-quantizes a weight with qbench's RTN grid."""
    global _CONFIG
    AOBaseConfig, _, handlers, DummyModule = _torchao()
    if _CONFIG is None:
        @dataclasses.dataclass
        class QBenchRTNConfig(AOBaseConfig):
            bits: int = 4
            group_size: int = 128

        def handler(module, config):
            return DummyModule(quantize_weight(module.weight, config.bits, "group", config.group_size,
                                               symmetric=False).to(module.weight.dtype))

        handlers[QBenchRTNConfig] = handler
        _CONFIG = QBenchRTNConfig
    return _CONFIG(bits=bits, group_size=group_size)


@torch.no_grad()
def awq_weights(model: nn.Module, linears: list[tuple[str, nn.Linear]], batches, bits: int = 4,
                group_size: int = 128, grid: int = 20) -> tuple[dict[str, torch.Tensor], int]:
    """name -> fake-quantized weight Q(W s) / s for every linear, and the calibration tokens."""
    _, AWQObserver, _, _ = _torchao()
    config = rtn_config(bits, group_size)
    observers = {name: AWQObserver(m.weight.detach().float(), None, config, scale_search_space_size=grid)
                 for name, m in linears}
    tokens = observe(model, linears, lambda name, x: observers[name](x.float(), None), batches)
    out = {}
    for name, m in linears:
        scales = observers[name].calculate_qparams().float()
        observers[name].inputs.clear()
        w = m.weight.detach().float()
        out[name] = (quantize_weight(w * scales, bits, "group", group_size, symmetric=False) / scales).to(m.weight.dtype)
    return out, tokens


@register_weight_method("awq", options=("group_size", "symmetric", "grid"), calibrated=True, check=grouped_asymmetric,
                        family="AWQ", slow=True, package="torchao")
def awq_scheme_weights(model, linears, scheme, batches) -> tuple[dict, dict]:
    weights, tokens = awq_weights(model, linears, batches, scheme.weight_bits, scheme.options["group_size"],
                                  scheme.options.get("grid", 20))
    return weights, {"calibration_tokens": tokens}
