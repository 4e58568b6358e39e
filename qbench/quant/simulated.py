"""The simulated backend, qbench's own dynamic quantizers: uniform symmetric int grids,
simulated (fake-quant in float) or computed for real with int8 x int8 -> int32 matmuls;
optionally the low-precision attention kernel (options["attention_kernel"])."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qbench.quant.handlers import register, require
from qbench.quant.int8_fused import quantizer, shared_codes
from qbench.quant.surgery import quantizable_linears, set_submodule

# the axis each granularity reduces over for one scale: weights (out, in), activations (N, in)
WEIGHT_SCALE_DIM = {"per_channel": 1, "per_tensor": None}
ACTIVATION_SCALE_DIM = {"per_token": 1, "per_tensor": None}


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
    """W8A8 dynamic: weights quantized once (per output channel or per tensor), activations
    at every call (per token or per tensor).

    Simulated: y = Q(x) Q(W)^T + b in float.  Real: the int8 codes are multiplied by the
    machine's int8 GEMM (qbench.quant.int8_gemm: fbgemm / x86 engine, oneDNN _int_mm, or the
    exact fp32 fallback, chosen by measurement) into int32 and rescaled by s_x s_w; both
    give the same numbers up to float rounding of the accumulation."""

    def __init__(self, linear: nn.Linear, weight_bits: int, activation_bits: int, int8_matmul: bool,
                 kernel: str | None = None, weight_granularity: str = "per_channel",
                 activation_granularity: str = "per_token"):
        super().__init__()
        if int8_matmul and (weight_bits != 8 or activation_bits != 8):
            raise ValueError("the real int8 path needs 8-bit weights and activations")
        if weight_granularity not in WEIGHT_SCALE_DIM or activation_granularity not in ACTIVATION_SCALE_DIM:
            raise ValueError(f"dynamic quantization: weights {list(WEIGHT_SCALE_DIM)}, activations "
                             f"{list(ACTIVATION_SCALE_DIM)}; got {weight_granularity!r}, {activation_granularity!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bits, self.activation_bits, self.int8_matmul = weight_bits, activation_bits, int8_matmul
        self.weight_granularity, self.activation_granularity = weight_granularity, activation_granularity
        weight = linear.weight.detach().float()
        scale = symmetric_scale(weight, weight_bits, dim=WEIGHT_SCALE_DIM[weight_granularity])  # (out, 1) or ()
        codes = quantize_symmetric(weight, scale, weight_bits)
        self.register_buffer("weight_scale", scale.reshape(-1).expand(self.out_features).clone())  # (out,)
        if int8_matmul:
            from qbench.quant.int8_gemm import Int8Gemm, choose

            self.register_buffer("weight_codes", codes.to(torch.int8))  # (out, in)
            self.kernel = kernel or choose(shape=(self.in_features, self.out_features))
            self.gemm = Int8Gemm(self.kernel, self.weight_codes, self.weight_scale)
        else:
            self.register_buffer("weight", codes * self.weight_scale.unsqueeze(1))  # dequantized, (out, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., in)
        x2 = x.reshape(-1, shape[-1]).float()
        if self.int8_matmul:
            # the simulated path's float operations, fused where exact: codes in the dtype the
            # kernel reads, scale (N, 1) per token or () per call; one quantization per input
            # tensor (q, k, v read the same one)
            spec = (self.activation_granularity == "per_token", self.gemm.zero_point, self.gemm.input_dtype)
            quantize, mode = quantizer(*spec, device=x2.device)
            x_codes, x_scale = shared_codes.get(x2, spec, quantize)
            y = self.gemm.linear(x_codes, x_scale, self.bias, native=mode == "native")  # ((X_q W_q^T) s_w) s_x + b
        else:
            # (N, 1): one per token, or (): one for the whole call
            x_scale = symmetric_scale(x2, self.activation_bits, dim=ACTIVATION_SCALE_DIM[self.activation_granularity])
            x_codes = quantize_symmetric(x2, x_scale, self.activation_bits)
            y = F.linear(x_codes * x_scale, self.weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        path = f"int8 matmul ({self.kernel})" if self.int8_matmul else "simulated"
        return (f"{self.in_features}->{self.out_features}, W{self.weight_bits} {self.weight_granularity} "
                f"A{self.activation_bits} {self.activation_granularity} {path}")


def _fusion_used(model: nn.Module) -> str:
    """Which quantize / rescale passes the model's int8 layers run (native or compiled where
    exact): decided now, on one layer's specialisation, the same for every layer of the model."""
    layer = next(m for m in model.modules() if isinstance(m, DynamicQuantLinear) and m.int8_matmul)
    return quantizer(layer.activation_granularity == "per_token", layer.gemm.zero_point, layer.gemm.input_dtype,
                     device=layer.weight_codes.device)[1]


def _check(scheme) -> None:
    for what, bits in (("weight_bits", scheme.weight_bits), ("activation_bits", scheme.activation_bits)):
        require(scheme, isinstance(bits, int) and 2 <= bits <= 8, f"{what} must be an int in 2..8, got {bits!r}")
    require(scheme, scheme.weight_granularity in WEIGHT_SCALE_DIM,
            f"weight_granularity {scheme.weight_granularity!r} is not one of {list(WEIGHT_SCALE_DIM)}")
    require(scheme, scheme.activation_granularity in ACTIVATION_SCALE_DIM,
            f"activation_granularity {scheme.activation_granularity!r} is not one of {list(ACTIVATION_SCALE_DIM)}")
    require(scheme, not scheme.int8_matmul or (scheme.weight_bits, scheme.activation_bits) == (8, 8),
            "int8_matmul needs 8-bit weights and activations")
    kernel = scheme.options.get("attention_kernel")
    if kernel is not None:
        from qbench.quant.lowbit_attention import LowBitAttention

        try:
            LowBitAttention(**kernel)
        except (TypeError, ValueError) as err:
            raise ValueError(f"scheme {scheme.name!r}: attention_kernel {kernel!r}: {err}") from None


@register("backend", "simulated", fields=("weight_bits", "weight_granularity", "activation_bits",
                                          "activation_granularity", "int8_matmul", "quantize_gates"),
          options=("attention_kernel",), check=_check, follow_device=True,
          devices=("cpu", "cuda"),  # torch ops; int8 GEMMs via torch._int_mm
          requires=lambda scheme: ("attention",) if scheme.options.get("attention_kernel") else ())
def apply_dynamic(model: nn.Module, scheme, calibration=None) -> dict:
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
        set_submodule(model, name, DynamicQuantLinear(
            linear, scheme.weight_bits, scheme.activation_bits, scheme.int8_matmul,
            kernels.get((linear.in_features, linear.out_features)), scheme.weight_granularity,
            scheme.activation_granularity))
    facts = {"quantized_linears": len(linears)}
    if kernels:
        used = sorted(set(kernels.values()))
        facts["int8_kernel"] = used[0] if len(used) == 1 else "+".join(used)
        facts["int8_kernel_by_shape"] = {f"{i}x{o}": k for (i, o), k in sorted(kernels.items())}
        facts["int8_fusion"] = _fusion_used(model)  # quantize and rescale passes: compiled or eager (why)
    kernel_options = scheme.options.get("attention_kernel")
    if kernel_options:
        from qbench.device import model_device
        from qbench.modeling.hooks import attention_layers
        from qbench.quant.lowbit_attention import LowBitAttention, blocks_in_use, install_kernel

        kernel = LowBitAttention(**kernel_options)
        facts["lowbit_attention_modules"] = install_kernel(model, kernel)
        layers = attention_layers(model)
        head_dim = getattr(layers[0][1], "head_dim", None) if layers else None
        facts["lowbit_attention_blocks"] = blocks_in_use(kernel, head_dim, model_device(model))  # C or torch (why)
    return facts
