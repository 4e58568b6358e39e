"""GPTQ (Frantar et al. 2023, Algorithm 1): 4-bit weights fitted to calibration inputs.

For a linear W (out, in) with inputs X, H = 2 X^T X / n (+ 1% of its mean diagonal as
damping); columns are quantized left to right, each one's error divided by the Cholesky
factor's diagonal is pushed onto the columns not yet quantized (lazy batches of 128
columns).  The per-group grid (asymmetric min-max, like `w4-rtn-g*`) is fitted on the
group's columns as they stand when the group starts, as in the reference implementation.

Hessians come from one pass of the full-precision model over the calibration batches
(torchao's default), not layer-by-layer from already-quantized layers.

Why not a library: torchao's GPTQ asserts CUDA and its int4 path needs `mslk`;
llmcompressor (the reference) pins transformers <= 5.17; AutoGPTQ / GPTQModel need CUDA
kernels.  The test compares this code with the paper's unbatched algorithm and with RTN.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qbench.quant.grid import affine_params, fake_quantize_affine
from qbench.quant.handlers import require
from qbench.quant.weight_only import grouped_asymmetric, register_weight_method

# the lazy batch width: how many columns are updated at once, the same result for any width
# (exact in float64), so a speed knob and not part of the scheme
GPTQ_BLOCK = 128


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid per row of `w` (rows, group): scale and integer zero (RTN's grid)."""
    return affine_params(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), bits)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return fake_quantize_affine(w, scale.squeeze(1), zero.squeeze(1), bits)


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 (dead inputs get H_ii = 1 and W[:, i] = 0).
    Computed on the weight's device, wherever the Hessian was accumulated."""
    h = hessian.to(weight.device, torch.float64, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h, upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  block_size: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The fake-quantized weight (out, in) GPTQ chooses."""
    w = weight.detach().double().clone()
    rows, columns = w.shape
    if group_size and (columns % group_size or block_size % group_size):
        raise ValueError(f"GPTQ: in_features {columns} and block {block_size} must be multiples of group {group_size}")
    hinv = inverse_hessian_factor(hessian, w, percdamp)
    q = torch.zeros_like(w)
    scale = zero = None
    if not group_size:
        scale, zero = group_params(w, bits)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if group_size and (i1 + i) % group_size == 0:
                scale, zero = group_params(w1[:, i:i + group_size], bits)
            column = w1[:, i]
            qc = quantize_column(column, scale, zero, bits)
            q[:, i1 + i] = qc
            e = (column - qc) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.to(weight.dtype)


def collect_hessians(model: nn.Module, linears: list[tuple[str, nn.Linear]], batches) -> tuple[dict, int]:
    """H = 2/n sum x x^T of each linear's inputs over the calibration tokens, in float64 on
    each linear's own device (where its inputs arrive and where GPTQ then uses it)."""
    from qbench.quant.observe import observe

    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
                for name, m in linears}
    counts = {name: 0 for name, _ in linears}

    def accumulate(name, x):
        x = x.double().to(hessians[name].device)
        n_old, n_new = counts[name], x.shape[0]
        hessians[name] *= n_old / (n_old + n_new)
        hessians[name] += (2.0 / (n_old + n_new)) * (x.t() @ x)
        counts[name] = n_old + n_new

    return hessians, observe(model, linears, accumulate, batches)


def _check(scheme) -> None:
    grouped_asymmetric(scheme)
    group = scheme.options.get("group_size")  # its lazy batches (GPTQ_BLOCK columns) hold whole groups
    require(scheme, isinstance(group, int) and GPTQ_BLOCK % group == 0,
            f"GPTQ's group_size {group!r} must divide its lazy-batch width {GPTQ_BLOCK}")


@register_weight_method("gptq", options=("group_size", "symmetric", "percdamp"), calibrated=True, check=_check,
                        family="GPTQ", slow=True)
def gptq_weights(model, linears, scheme, batches) -> tuple[dict, dict]:
    hessians, tokens = collect_hessians(model, linears, batches)
    return {name: gptq_quantize(linear.weight, hessians.pop(name), scheme.weight_bits, scheme.options["group_size"],
                                GPTQ_BLOCK, scheme.options.get("percdamp", 0.01))
            for name, linear in linears}, {"calibration_tokens": tokens}
