"""Rotate the residual stream (QuaRot's offline rotation of a pre-norm decoder).

1. Fold every norm's scale (and LayerNorm's bias) into the linears that read it, and the
   final norm into the LM head (untied from the embeddings); the norms become weightless
   RMS norms.  A LayerNorm model is first made mean-free (SliceGPT): each embedding row and
   each residual writer's output is centred, so LayerNorm equals RMS norm on the stream.
2. With Q a randomized Hadamard matrix (torchao's QuaRot/QuIP# construction, seeded),
   x -> x Q everywhere: embeddings E Q, readers W Q, writers Q^T W (and Q^T b), head W Q.
   An RMS norm without weight commutes with Q (|x Q| = |x|), so the float model is unchanged.

No online Hadamard transforms (QuaRot also rotates down_proj inputs and V/O heads online):
this is the residual-stream rotation only, which moves the massive activations a
per-tensor quantizer sees at norm outputs, residual sums and linear inputs.

Why not a library: torchao's SpinQuant prototype rotates Llama checkpoints of its own
model definition (torchao.models) and not Hugging Face or qbench modules; its Hadamard
matrices are used here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qbench.quant.handlers import register
from qbench.quant.surgery import set_submodule
from qbench.quant.structure import residual_structure


class WeightlessRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps), in float32 (or float64) like Llama's (the name ends in RMSNorm, so the
    w8a8-pt protocol quantizes its output like any norm's)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x if x.dtype == torch.float64 else x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, weight folded into the readers"


class RotatedHeadwiseGate(nn.Module):
    """An input_head gate after rotation: the head slices of the rotated input no longer
    hold one head's channels, so the gate becomes one full (block-diagonal, then rotated)
    linear map applied to the whole input; it is still called with the head view."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, n_head: int, out_per_head: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (H * out, d)
        self.bias = nn.Parameter(bias, requires_grad=False)  # (H * out,)
        self.n_head, self.out_per_head = n_head, out_per_head

    @classmethod
    def from_headwise(cls, gate) -> "RotatedHeadwiseGate":
        h, d, o = gate.weight.shape
        full = torch.zeros(h * o, h * d, dtype=gate.weight.dtype)
        for i in range(h):
            full[i * o:(i + 1) * o, i * d:(i + 1) * d] = gate.weight[i].detach().t()
        return cls(full, gate.bias.detach().reshape(-1).clone(), h, o)

    def forward(self, x_heads: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x_heads.shape
        x = x_heads.transpose(1, 2).reshape(b, t, h * d)
        logits = nn.functional.linear(x, self.weight, self.bias)  # (B, T, H * out)
        return logits.view(b, t, h, self.out_per_head).transpose(1, 2)


def _linear_with_bias(linear: nn.Linear) -> nn.Linear:
    if linear.bias is not None:
        return linear
    new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        new.bias.zero_()
    if type(linear) is not nn.Linear:  # keep GateLinear a gate
        new.__class__ = type(linear)
    return new


@torch.no_grad()
def fold_norms(model: nn.Module) -> dict:
    """Steps 1: norms into their readers (and, for LayerNorm models, the mean-free stream)."""
    from qbench.modeling.model import HeadwiseGate

    s = residual_structure(model, "rotation")
    head_name, head = s.head
    if head.weight is model.get_input_embeddings().weight:  # tied: the head gets its own copy
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    if s.layer_norm:
        for _, emb in s.embeddings:
            emb.weight.sub_(emb.weight.mean(dim=1, keepdim=True))
        for _, writer in (w for group in s.groups for w in group.writers):
            writer.weight.sub_(writer.weight.mean(dim=0, keepdim=True))
            if writer.bias is not None:
                writer.bias.sub_(writer.bias.mean())
    groups = [(g.norm, g.readers) for g in s.groups] + [(s.final_norm[1], [s.head])]
    norm_names = [g.name for g in s.groups] + [s.final_norm[0]]
    for (norm, readers), norm_name in zip(groups, norm_names):
        gamma = s.scale(norm)  # Gemma's norms scale by 1 + w
        beta = getattr(norm, "bias", None)
        for name, reader in readers:
            if isinstance(reader, HeadwiseGate):
                h, d, o = reader.weight.shape
                if beta is not None:
                    reader.bias.add_(torch.einsum("hdo,hd->ho", reader.weight, beta.detach().view(h, d)))
                reader.weight.mul_(gamma.view(h, d, 1).to(reader.weight.dtype))
                continue
            if beta is not None:
                bias_add = reader.weight.detach() @ beta.detach().to(reader.weight.dtype)
                if reader.bias is None:
                    reader = _linear_with_bias(reader)
                    set_submodule(model, name, reader)
                reader.bias.add_(bias_add.to(reader.bias.dtype))
            reader.weight.mul_(gamma.view(1, -1).to(reader.weight.dtype))
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6
        set_submodule(model, norm_name, WeightlessRMSNorm(eps))
    return {"folded_norms": len(groups), "mean_free_stream": s.layer_norm}


@torch.no_grad()
def rotate(model: nn.Module, seed: int = 0) -> dict:
    """Fold the norms, then rotate the residual stream by a seeded randomized Hadamard Q."""
    try:
        from torchao.prototype.spinquant.hadamard_utils import random_hadamard_matrix
    except ImportError as err:
        raise ImportError("rotation schemes use torchao's Hadamard matrices: pip install 'torchao==0.18.0'") from err
    from qbench.modeling.model import HeadwiseGate

    facts = fold_norms(model)
    s = residual_structure(model, "rotation")
    d = s.embeddings[0][1].weight.shape[1]
    try:
        q = random_hadamard_matrix(d, "cpu", seed=seed).double()
    except (AssertionError, ValueError) as err:
        raise ValueError(f"no Hadamard matrix of order {d} (the residual width) is known: {err}") from err
    for _, emb in s.embeddings:
        emb.weight.copy_((emb.weight.double() @ q.to(emb.weight.device)).to(emb.weight.dtype))
    readers = [r for g in s.groups for r in g.readers] + [s.head]
    for name, reader in readers:
        if isinstance(reader, HeadwiseGate):
            reader = RotatedHeadwiseGate.from_headwise(reader)
            set_submodule(model, name, reader)
        w = reader.weight
        w.copy_((w.double() @ q.to(w.device)).to(w.dtype))
    for _, writer in (w for group in s.groups for w in group.writers):
        writer.weight.copy_((q.t().to(writer.weight.device) @ writer.weight.double()).to(writer.weight.dtype))
        if writer.bias is not None:
            writer.bias.copy_((q.t().to(writer.bias.device) @ writer.bias.double()).to(writer.bias.dtype))
    return {**facts, "transform": "hadamard", "rotation": "randomized Hadamard (torchao spinquant)",
            "rotation_seed": seed, "width": d}


@register("transform", "hadamard", options=("calibration_seed",), devices=("cpu", "cuda"), requires=("rotation",))
def apply_hadamard(model: nn.Module, scheme, calibration=None) -> dict:
    # the draw seed seeds the Hadamard signs: --calibration-seeds gives independent rotations
    return rotate(model, seed=scheme.options.get("calibration_seed", 0))
