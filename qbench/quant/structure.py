"""What the residual-stream transforms (SmoothQuant: fold scales into a norm and its
readers; rotations, QuaRot: rotate everything that reads or writes the stream) read of a
model: its norm groups, from the one module that knows model families
(qbench.modeling.families), and which of a norm's readers are gates (they stay in full
precision and take no SmoothQuant scale of their own)."""
from __future__ import annotations

import torch.nn as nn

from qbench.modeling.families import NormGroup, ResidualStructure, UnsupportedModel, residual_structure

__all__ = ["NormGroup", "ResidualStructure", "UnsupportedModel", "is_gate", "residual_structure"]


def is_gate(module: nn.Module) -> bool:
    from qbench.modeling.model import GateLinear, HeadwiseGate

    return isinstance(module, (GateLinear, HeadwiseGate))
