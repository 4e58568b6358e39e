"""The low-precision gated-attention kernel: every arm's attention computed in 8 bits.

Vectorised over (batch x heads), with queries in chunks of at most `query_chunk` rows, so
at most one (B, H, chunk, T_k) block of scores exists at a time:
  Q, K int8 (per-token scales, or one scale per head);  V int8 (per-channel scales within
  each head, or one per head: a per-token scale could not leave the P V sum);
  S = Q K^T as an int8 x int8 -> int32 matmul, rescaled by s_q s_k / sqrt(d);
  P = the arm's normaliser (`arm.normalise`, the same function as the float path) in
  float, then quantized to 8 bits: unsigned codes with scale 1/255 (every registered
  normaliser's weights lie in [0, 1]), or float8 e4m3;
  O = P V as an 8-bit matmul (uint8 codes are shifted by -128 into int8 and the shift is
  added back exactly: P V = (P' + 128) V = P' V + 128 colsum(V));
  gates: the module's own gate function, fed the *dequantized* V where the gate reads
  values, quantized to 8 bits (scale 1/255); at the value position it scales V
  (re-quantized to int8) before P V, at the output position it scales O.
The kernel names no arm: qbench.modeling.compose.compose applies the arm's gate and hands
the kernel its normaliser; the kernel substitutes its blocks (`quantize_values`,
`quantize_gate`, `weighted_sum`) for the float ones there, beside the float path.

Where the CPU has AVX-512 VNNI (QBENCH_INT8_FUSION=native, the default; int8 P, per-token
scales, head width a multiple of 16), V's codes (with the dequantized V a gate reads), a
value-position gate's rounding and g V's re-quantization, Q's and K's codes with Q K^T and
the score block, and P's codes with P V and the context block run as C
(qbench.quant.attention_native), the normaliser between them, with the same numbers bit for
bit; elsewhere the torch blocks below (compiled where bit-equal, else eager).
"""
from __future__ import annotations

import functools

import torch

from qbench.quant.int8_fused import fused, per_fusion_mode

INT8_MAX = 127


def int8_codes(x: torch.Tensor, dim: int | tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and scales (max|x| / 127 over `dim`, keepdim; whole tensor if None).
    |x| / scale <= 127 by construction, so the codes need no clamp (fewer passes: this runs
    three times per attention call)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp_min(1e-8).div_(INT8_MAX)
    return x.div(scale).round_().to(torch.int8), scale


# Partial sums of int8 x int8 products stay exact in fp32 while |sum| < 2^24:
# K * 128 * 128 < 2^24 holds for K <= 1024 (Q K^T: K = head width; P V: K = T).
EXACT_FP32_K = 2**24 // (128 * 128)


def _has_int8_units() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in capability or "AMX" in capability


INT8_UNITS = _has_int8_units()


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (..., M, K) x int8 (..., K, N) -> int32, exact.  torch._int_mm (2-D, one call per
    leading index) where the CPU has int8 dot-product units (AVX-512 VNNI / AMX); on
    AVX2-only CPUs _int_mm takes a slow reference path, so the same integers are computed
    by the batched fp32 GEMM, which is exact while K <= 1024 (each partial sum below
    2^24), in K-chunks otherwise."""
    if INT8_UNITS and a.device.type == "cpu":
        if a.dim() == 2:
            return torch._int_mm(a.contiguous(), b if b.t().is_contiguous() else b.contiguous())
        lead = a.shape[:-2]
        # one contiguous copy of each operand at most, results written in place; a right operand
        # whose matrices are column-major (a transposed view, K^T) is read as it is: oneDNN
        # takes that layout without the transposing copy
        a2 = a.contiguous().reshape(-1, *a.shape[-2:])
        if b.transpose(-1, -2).is_contiguous():
            b2 = b.transpose(-1, -2).reshape(-1, b.shape[-1], b.shape[-2]).transpose(-1, -2)
        else:
            b2 = b.contiguous().reshape(-1, *b.shape[-2:])
        out = torch.empty(a2.shape[0], a2.shape[1], b2.shape[2], dtype=torch.int32, device=a.device)
        for i in range(a2.shape[0]):
            torch._int_mm(a2[i], b2[i], out=out[i])
        return out.reshape(*lead, *out.shape[-2:])
    out = None
    for start in range(0, a.shape[-1], EXACT_FP32_K):
        part = (a[..., start:start + EXACT_FP32_K].float() @ b[..., start:start + EXACT_FP32_K, :].float()).to(torch.int32)
        out = part if out is None else out + part
    return out


# The elementwise passes over each score block, written once in eager torch and fused by
# torch.compile where bit-equal (qbench.quant.int8_fused): at T = 1024 they were more than
# half the kernel's time as separate passes (int32 -> float, the outer product of scales,
# two multiplies, the mask; the four passes that quantize P; the context's rescale).

def score_block(acc: torch.Tensor, q_scale: torch.Tensor, k_scale_row: torch.Tensor, scaling: float,
                bias: torch.Tensor) -> torch.Tensor:
    """int32 Q K^T (B, H, Tq, Tk) -> float scores s_q s_k / sqrt(d), hidden keys at -inf.
    `bias` is the additive mask (0 visible, -inf hidden; `hidden_bias`): adding it gives the
    masked_fill result bit for bit (x + 0 = x; a finite x + -inf = -inf; only a -0 score
    becomes +0, which no normaliser tells apart), and compiles to one vectorised pass where
    the boolean fill measured twice as slow."""
    return acc.float() * (q_scale * k_scale_row) * scaling + bias


def hidden_bias(hidden: torch.Tensor) -> torch.Tensor:
    """A boolean mask of hidden keys as the additive mask score_block takes."""
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))


@functools.lru_cache(maxsize=32)
def causal_bias(t_q: int, t_k: int, device) -> torch.Tensor:
    from qbench.modeling.attention import future_mask

    return hidden_bias(future_mask(t_q, t_k, device))


def prob_codes(p: torch.Tensor) -> torch.Tensor:
    """P in [0, 1] -> uint8 codes round(255 p) shifted by -128 into int8 (exact)."""
    return (p * 255.0).round().sub(128).to(torch.int8)


def context_block(acc: torch.Tensor, column_sums: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """int32 P' V + 128 colsum(V) -> (P V) in float: / 255, * s_v."""
    return (acc + 128 * column_sums).float() / 255.0 * v_scale


@per_fusion_mode
def _check_blocks(device) -> dict:
    """The score, probability and context blocks, fused where bit-equal."""
    def check(eager, make):
        def run(candidate):
            for shape in ((1, 2, 5, 7), (2, 3, 16, 33)):
                args = make(shape)
                if not torch.equal(eager(*args), candidate(*args)):
                    return f"{eager.__name__} differs from eager"
            return None
        return run

    g = torch.Generator().manual_seed(0)

    def scores_args(shape):
        b, h, tq, tk = shape
        acc = torch.randint(-2**20, 2**20, shape, generator=g, dtype=torch.int32)
        hidden = torch.triu(torch.ones(tq, tk, dtype=torch.bool), diagonal=1)
        return (acc, torch.rand(b, h, tq, 1, generator=g), torch.rand(b, h, 1, tk, generator=g), 0.125,
                hidden_bias(hidden))

    def probs_args(shape):
        p = torch.rand(shape, generator=g)
        p.view(-1)[:4] = torch.tensor([0.5 / 255, 1.5 / 255, 1.0, 0.0])  # ties and ends
        return (p,)

    def context_args(shape):
        b, h, tq, d = shape
        acc = torch.randint(-2**22, 2**22, shape, generator=g, dtype=torch.int32)
        return acc, torch.randint(-2**14, 2**14, (b, h, 1, d), generator=g, dtype=torch.int32), torch.rand(b, h, 1, d, generator=g)

    return {name: fused(f"attention {name}", fn, check(fn, make), device)[0]
            for name, fn, make in (("scores", score_block, scores_args), ("probs", prob_codes, probs_args),
                                   ("context", context_block, context_args))}


@per_fusion_mode
def _codes(dim, device):
    """int8_codes over `dim`, fused where bit-equal (one pass instead of six)."""
    eager = functools.partial(int8_codes, dim=dim)

    def check(candidate):
        g = torch.Generator().manual_seed(0)
        for shape in ((1, 2, 5, 8), (2, 3, 17, 64)):
            x = torch.randn(shape, generator=g) * 5
            x[..., 0, :] = 0.0
            want, got = eager(x), candidate(x)
            if not (torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])):
                return f"int8 codes over {dim} differ from eager"
        return None
    return fused(f"attention codes {dim}", eager, check, device)[0]


def prologue(q: torch.Tensor, k: torch.Tensor, v_codes: torch.Tensor, qk_dim) -> tuple:
    """Q and K codes with their scales, and V's column sums (int32, (B, H, 1, D))."""
    return (*int8_codes(q, qk_dim), *int8_codes(k, qk_dim), v_codes.to(torch.int32).sum(dim=-2, keepdim=True))


@per_fusion_mode
def _prologue(qk_dim, device):
    """`prologue` fused where bit-equal (one compiled call instead of two and an eager sum)."""
    eager = functools.partial(prologue, qk_dim=qk_dim)

    def check(candidate):
        g = torch.Generator().manual_seed(0)
        for b, h, t_q, t_k, d in ((1, 2, 5, 5, 8), (2, 3, 17, 23, 64)):
            q, k = torch.randn(b, h, t_q, d, generator=g) * 5, torch.randn(b, h, t_k, d, generator=g) * 5
            q[..., 0, :] = 0.0
            v_codes = torch.randint(-127, 128, (b, h, t_k, d), generator=g, dtype=torch.int8)
            if not all(torch.equal(w, c) for w, c in zip(eager(q, k, v_codes), candidate(q, k, v_codes))):
                return f"the codes of Q and K over {qk_dim} or V's column sums differ from eager"
        return None
    return fused(f"attention prologue {qk_dim}", eager, check, device)[0]


def quantize_probs(p: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return torch.round(p * 255.0)  # codes 0..255, scale 1/255
    if fmt == "fp8":
        return p.to(torch.float8_e4m3fn).float()
    raise ValueError(f"probability format must be 'int8' or 'fp8', got {fmt!r}")


def quantize_gate(g: torch.Tensor) -> torch.Tensor:
    return torch.round(g * 255.0) / 255.0


class LowBitAttention:
    """An `AttentionKernel` (qbench.modeling.hooks): attached to attention modules as
    `qbench_kernel`, ours and stock HF ones alike."""

    def __init__(self, probs: str = "int8", qkv_granularity: str = "token", query_chunk: int = 256):
        if qkv_granularity not in ("token", "head"):
            raise ValueError(f"qkv_granularity must be 'token' or 'head', got {qkv_granularity!r}")
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
        quantize_probs(torch.zeros(1), probs)  # validates the format
        self.probs, self.qkv_granularity, self.query_chunk = probs, qkv_granularity, query_chunk

    @property
    def _qk_dim(self):
        """Q and K (B, H, T, D): per token, or one scale per (sequence, head)."""
        return -1 if self.qkv_granularity == "token" else (-2, -1)

    def quantize_values(self, v: torch.Tensor, dequantized: bool = False):
        """(B, H, T, D): per channel within each (sequence, head), or one per (sequence, head)
        -> (codes, scales); with `dequantized`, also codes * scales (what a gate that reads
        values sees)."""
        if self.qkv_granularity == "token" and v.shape[-2] and _c_blocks_available(v, v):
            from qbench.quant import attention_native

            return attention_native.value_codes(v, dequantized)  # the same numbers, one C call
        codes, scale = _codes(-2 if self.qkv_granularity == "token" else (-2, -1), v.device)(v)
        return (codes, scale, codes.float() * scale) if dequantized else (codes, scale)

    @staticmethod
    def quantize_gate(g: torch.Tensor) -> torch.Tensor:
        return quantize_gate(g)

    def gated_values(self, g: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor):
        """A gate at the value position: g quantized to 8 bits, times the dequantized V, the
        product re-quantized as V is -> (codes, scales)."""
        from qbench.quant import attention_native

        if (self.qkv_granularity == "token" and v_codes.shape[-2] and _native_level()
                and attention_native.gate_supported(g, v_codes)):
            return attention_native.gated_value_codes(g, v_codes, v_scale)  # the same numbers, one C call
        return self.quantize_values(quantize_gate(g) * (v_codes.float() * v_scale))

    def _c_blocks(self, q: torch.Tensor, v_codes: torch.Tensor) -> bool:
        """The C blocks serve this call: int8 P, per-token Q/K scales, the native fusion level,
        a CPU with AVX-512 VNNI, float32 queries, a head width that is a multiple of 16."""
        return self.probs == "int8" and self.qkv_granularity == "token" and _c_blocks_available(q, v_codes)

    def weighted_sum(self, q: torch.Tensor, k: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                     normalise, module, scaling: float, hidden: torch.Tensor | None,
                     hooks=None) -> torch.Tensor:
        """P V in 8 bits for every (sequence, head) at once: q, k (B, H, T, D) float; V as
        int8 codes (B, H, T_k, D) with scales (B, H, 1 | T_k..., D).  `hidden` (broadcastable
        to (B, H, T_q, T_k)) marks hidden keys; None = causal.  Queries are processed in
        chunks of `query_chunk`; P[..., 0] goes to `hooks.first_column` when hooks are set.
        The chunk's blocks are C (`_c_chunk_blocks`) where they serve, else torch ops."""
        t_q, t_k = q.shape[-2], k.shape[-2]
        chunk_blocks = self._c_chunk_blocks if self._c_blocks(q, v_codes) else self._torch_chunk_blocks
        scores_of, context_into = chunk_blocks(q, k, v_codes, v_scale, scaling)
        bias = causal_bias(t_q, t_k, q.device) if hidden is None else hidden_bias(hidden)
        # laid out as (B, T, H, D): merging the heads afterwards is a view, not a copy
        b, h = q.shape[0], q.shape[1]
        out = torch.empty(b, t_q, h, v_codes.shape[-1], dtype=torch.float32, device=q.device).transpose(1, 2)
        first = [] if hooks is not None else None
        for start in range(0, t_q, self.query_chunk):
            stop = min(start + self.query_chunk, t_q)
            p = normalise(scores_of(start, stop, bias[..., start:stop, :]), module)
            if first is not None:
                first.append(p[..., 0].clone())
            context_into(p, out[..., start:stop, :])
        if first is not None and hasattr(hooks, "first_column"):
            hooks.first_column(torch.cat(first, dim=-1))
        return out

    def _torch_chunk_blocks(self, q, k, v_codes, v_scale, scaling: float) -> tuple:
        """(scores of queries start:stop, P -> P V written into the chunk's rows) in torch ops:
        Q and K codes with V's column sums in one fused call (at T = 256 each call's fixed
        cost was as long as its arithmetic), per-head int8 GEMMs, the compiled blocks."""
        t_q = q.shape[-2]
        q_codes, q_scale, k_codes, k_scale, column_sums = _prologue(self._qk_dim, q.device)(q, k, v_codes)
        # K^T as a view of contiguous codes: each head's matrix column-major (int_matmul reads it so)
        k_t, k_scale_row = k_codes.contiguous().transpose(-1, -2), k_scale.transpose(-1, -2)  # (B, H, D, T_k), (B, H, 1, T_k | 1)
        blocks = _check_blocks(q.device)

        def scores_of(start, stop, bias):
            qs = q_scale[..., start:stop, :] if q_scale.shape[-2] == t_q else q_scale  # per token or per head
            return blocks["scores"](int_matmul(q_codes[..., start:stop, :], k_t), qs, k_scale_row, scaling, bias)

        def context_into(p, rows):
            if self.probs == "int8":
                shifted = blocks["probs"](p)  # uint8 codes 0..255 as int8, exact shift
                rows.copy_(blocks["context"](int_matmul(shifted, v_codes), column_sums, v_scale))
            else:  # fp8 P: products exact in fp32
                rows.copy_(quantize_probs(p, self.probs) @ (v_codes.float() * v_scale))
        return scores_of, context_into

    def _c_chunk_blocks(self, q, k, v_codes, v_scale, scaling: float) -> tuple:
        """The same two blocks in C (qbench.quant.attention_native): Q and K quantized per token
        inside the calls that read them (in the projection's layout), K and V packed once."""
        from qbench.quant import attention_native

        packed = attention_native.Packed(k, v_codes, v_scale)

        def scores_of(start, stop, bias):
            return packed.scores(q[..., start:stop, :], scaling, bias)
        return scores_of, packed.context_into


def _native_level() -> bool:
    """QBENCH_INT8_FUSION=native and the native row quantizer (whose arithmetic the C blocks
    share) checked exact here against the eager passes."""
    from qbench.quant import int8_fused

    return int8_fused._mode() == "native" and int8_fused._native(0, torch.int8)[0] is not None


def _c_blocks_available(q: torch.Tensor, v_codes: torch.Tensor) -> bool:
    from qbench.quant import attention_native

    return _native_level() and attention_native.supported(q, v_codes)


def blocks_in_use(kernel: LowBitAttention, head_dim: int | None, device) -> str:
    """Which blocks the kernel runs on this machine for heads of `head_dim`, for the record:
    "c" (qbench.quant.attention_native) or "torch (why not C)"."""
    from qbench.quant import attention_native, int8_fused

    if kernel.probs != "int8" or kernel.qkv_granularity != "token":
        return "torch (fp8 P or per-head scales)"
    if int8_fused._mode() != "native" or torch.device(device).type != "cpu":
        return f"torch (QBENCH_INT8_FUSION={int8_fused._mode()}, {torch.device(device).type})"
    lib, why = attention_native.library()
    if lib is None:
        return f"torch ({why})"
    if head_dim is None or head_dim % 16 or head_dim > attention_native.MAX_HEAD_DIM:
        return f"torch (head width {head_dim})"
    if int8_fused._native(0, torch.int8)[0] is None:
        return f"torch (native quantizer: {int8_fused._native(0, torch.int8)[1]})"
    return "c"


def install_kernel(model: torch.nn.Module, kernel: LowBitAttention) -> int:
    """Attach the kernel to every attention module (ours directly, stock HF ones through the
    attention registry)."""
    from qbench.modeling.hooks import attention_layers

    layers = attention_layers(model)
    for _, module in layers:
        module.qbench_kernel = kernel
    return len(layers)
