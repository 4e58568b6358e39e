"""qbench's own quantizers: uniform symmetric int grids, simulated (fake-quant in float) or
computed for real with int8 x int8 -> int32 matmuls."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qbench.modeling.model import GateLinear


def symmetric_scale(x: torch.Tensor, bits: int, dim: int | None) -> torch.Tensor:
    """max|x| / (2^(b-1) - 1) over `dim` (keepdim), or over the whole tensor when dim is None."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return amax.clamp_min(1e-8) / qmax


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes round(x / s) clamped to [-(2^(b-1) - 1), 2^(b-1) - 1] (still a float tensor)."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -qmax, qmax)


def fake_quantize_symmetric(x: torch.Tensor, bits: int, dim: int | None) -> torch.Tensor:
    scale = symmetric_scale(x, bits, dim)
    return quantize_symmetric(x, scale, bits) * scale


class DynamicQuantLinear(nn.Module):
    """W8A8 dynamic: per-output-channel weights (quantized once), per-token activations.

    Simulated: y = Q(x) Q(W)^T + b in float.  Real: the int8 codes are multiplied by the
    machine's int8 GEMM (qbench.quant.int8_gemm: fbgemm / x86 engine, oneDNN _int_mm, or the
    exact fp32 fallback, chosen by measurement) into int32 and rescaled by s_x s_w; both
    give the same numbers up to float rounding of the accumulation."""

    def __init__(self, linear: nn.Linear, weight_bits: int, activation_bits: int, int8_matmul: bool,
                 kernel: str | None = None):
        super().__init__()
        if int8_matmul and (weight_bits != 8 or activation_bits != 8):
            raise ValueError("the real int8 path needs 8-bit weights and activations")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bits, self.activation_bits, self.int8_matmul = weight_bits, activation_bits, int8_matmul
        weight = linear.weight.detach().float()
        scale = symmetric_scale(weight, weight_bits, dim=1)  # (out, 1)
        codes = quantize_symmetric(weight, scale, weight_bits)
        self.register_buffer("weight_scale", scale.squeeze(1))  # (out,)
        if int8_matmul:
            from qbench.quant.int8_gemm import Int8Gemm, choose

            self.register_buffer("weight_codes", codes.to(torch.int8))  # (out, in)
            self.kernel = kernel or choose(shape=(self.in_features, self.out_features))
            self.gemm = Int8Gemm(self.kernel, self.weight_codes, self.weight_scale)
        else:
            self.register_buffer("weight", codes * scale)  # dequantized, (out, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., in)
        x2 = x.reshape(-1, shape[-1]).float()
        x_scale = symmetric_scale(x2, self.activation_bits, dim=1)  # (N, 1): one per token
        x_codes = quantize_symmetric(x2, x_scale, self.activation_bits)
        if self.int8_matmul:
            y = self.gemm(x_codes) * x_scale  # (N, out): X_q W_q^T s_w, then the per-token scales
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x_codes * x_scale, self.weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        path = f"int8 matmul ({self.kernel})" if self.int8_matmul else "simulated"
        return f"{self.in_features}->{self.out_features}, W{self.weight_bits}A{self.activation_bits} {path}"


def quantizable_linears(model: nn.Module, quantize_gates: bool = False) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear except the LM head (kept in full precision, as in Bondarenko's
    protocol) and, unless asked, the attention gates."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
        and (quantize_gates or not isinstance(module, GateLinear))
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_dynamic(model: nn.Module, scheme) -> dict:
    linears = quantizable_linears(model, scheme.quantize_gates)
    kernels = {}
    if scheme.int8_matmul:
        from qbench.device import model_device
        from qbench.quant.int8_gemm import choose

        for _, linear in linears:  # per layer shape: the fastest exact kernel measured here
            shape = (linear.in_features, linear.out_features)
            # the engines are CPU kernels; elsewhere the same integers through the exact fp32 GEMM
            kernels[shape] = choose(shape=shape) if model_device(model).type == "cpu" else "fp32-exact"
    for name, linear in linears:
        _set_submodule(model, name, DynamicQuantLinear(
            linear, scheme.weight_bits, scheme.activation_bits, scheme.int8_matmul,
            kernels.get((linear.in_features, linear.out_features))))
    facts = {"quantized_linears": len(linears)}
    if kernels:
        used = sorted(set(kernels.values()))
        facts["int8_kernel"] = used[0] if len(used) == 1 else "+".join(used)
        facts["int8_kernel_by_shape"] = {f"{i}x{o}": k for (i, o), k in sorted(kernels.items())}
    return facts
