"""What the residual-stream transforms (SmoothQuant: fold scales into a norm and its
readers; rotations, QuaRot: rotate everything that reads or writes the stream) read of a
model: its norm groups, from the one module that knows model families
(qbench.modeling.families), and which of a norm's readers are gates (they stay in full
precision and take no SmoothQuant scale of their own)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["NormGroup", "ResidualStructure", "UnsupportedModel", "is_gate", "residual_structure"]


def __getattr__(name: str):
    """The families' names, imported on first use: qbench.modeling loads transformers (and
    the optional packages it loads), which importing qbench.quant must not."""
    if name in ("NormGroup", "ResidualStructure", "UnsupportedModel"):
        from qbench.modeling import families

        return getattr(families, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def residual_structure(model: nn.Module, need: str):
    from qbench.modeling.families import residual_structure as structure

    return structure(model, need)


def is_gate(module: nn.Module) -> bool:
    from qbench.modeling.model import GateLinear, HeadwiseGate

    return isinstance(module, (GateLinear, HeadwiseGate))
