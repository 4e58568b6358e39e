"""The low-precision kernel against the float reference, with bounds from the step sizes.

For one head with per-token Q/K scales s_q, s_k and per-channel V scales s_v:
  |S_hat - S|_ij <= c (s_qi/2 ||k_j||_1 + s_kj/2 ||q_hat_i||_1) <= delta_i,  c = 1/sqrt(d)
  ||P_hat_i - P_i||_1 <= exp(2 delta_i) - 1    (each p_j moves by a factor in [e^-2d, e^2d])
  8-bit P adds <= 1/510 per visible key;  int8 V adds <= s_v/2 per element, so
  |O_hat - O|_i <= (exp(2 delta_i) - 1 + n_i/510) max|V_hat| + s_v/2.
"""
import math

import pytest
import torch

from qbench.modeling import ATTENTION_ARMS, QBenchConfig
from qbench.modeling.attention import NORMALISERS, softmax_weights
from qbench.modeling.compose import compose
from qbench.modeling.model import QBenchAttention
from qbench.quant.lowbit_attention import LowBitAttention, causal_bias, int8_codes, quantize_gate

T, D = 48, 16


def block_bound(q, k, v):
    q_codes, s_q = int8_codes(q, dim=-1)
    _, s_k = int8_codes(k, dim=-1)
    _, s_v = int8_codes(v, dim=0)
    q_hat = q_codes.float() * s_q
    c = 1 / math.sqrt(q.shape[-1])
    delta = c * (s_q / 2 * k.abs().sum(-1).reshape(1, -1) + s_k.reshape(1, -1) / 2 * q_hat.abs().sum(-1, keepdim=True))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    delta = delta.masked_fill(~causal, 0).amax(dim=1, keepdim=True)  # (T, 1)
    n_visible = torch.arange(1, T + 1).reshape(-1, 1)
    v_max = (v.abs().amax() + s_v.amax())
    return (torch.exp(2 * delta) - 1 + n_visible / 510) * v_max + s_v / 2 + 1e-5


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_block_within_bound_of_float_attention(scale):
    torch.manual_seed(0)
    q, k, v = torch.randn(T, D) * scale, torch.randn(T, D) * scale, torch.randn(T, D)
    kernel = LowBitAttention(probs="int8")
    v_codes, v_scale = int8_codes(v[None, None], dim=-2)
    got = kernel.weighted_sum(q[None, None], k[None, None], v_codes, v_scale, softmax_weights, None,
                              1 / math.sqrt(D), None)[0, 0]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    reference = torch.softmax((q @ k.t() / math.sqrt(D)).masked_fill(~causal, float("-inf")), -1) @ v
    error = (got - reference).abs()
    assert (error <= block_bound(q, k, v)).all()
    assert error.max() > 1e-4  # it really is low precision


def test_int8_probability_path_is_exact_integer_arithmetic():
    """The uint8 -> int8 shift trick gives exactly P_codes @ V_codes."""
    torch.manual_seed(0)
    p_codes = torch.randint(0, 256, (T, T)).float()
    v_codes = torch.randint(-127, 128, (T, D), dtype=torch.int8)
    shifted = (p_codes - 128).to(torch.int8)
    acc = torch._int_mm(shifted, v_codes) + 128 * v_codes.to(torch.int32).sum(0, keepdim=True)
    assert torch.equal(acc.long(), p_codes.long() @ v_codes.long())


def score_delta(q, k):
    """delta_i: the largest score error of query i over its visible keys (module docstring)."""
    q_codes, s_q = int8_codes(q, dim=-1)
    _, s_k = int8_codes(k, dim=-1)
    q_hat = q_codes.float() * s_q
    c = 1 / math.sqrt(q.shape[-1])
    delta = c * (s_q / 2 * k.abs().sum(-1).reshape(1, -1) + s_k.reshape(1, -1) / 2 * q_hat.abs().sum(-1, keepdim=True))
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    return delta.masked_fill(~causal, 0).amax(dim=1, keepdim=True)  # (T, 1)


def weights_error(normaliser, scores, delta, module, head):
    """Bound on ||P_hat_i - P_i||_1 when every visible score of row i moves by <= delta_i.
    softmax / sink logit: each weight moves by a factor in [e^-2delta, e^2delta] (the sink
    logit is not quantized);  clipped: Lipschitz (1 + alpha/T) per weight on top of that;
    sigmoid: sigma' <= 1/4, so n_i delta_i / 4;  softpick: with a_j = e^x_j - 1, |da_j| <=
    A_j = e^x_j (e^delta - 1); numerator and denominator D move by <= sum A, so
    ||dP||_1 <= 2 sum_j A_j / (D - sum_j A_j)."""
    visible = torch.isfinite(scores)
    n = visible.sum(-1, keepdim=True)
    if normaliser in ("softmax", "sink_logit"):
        return torch.exp(2 * delta) - 1
    if normaliser == "clipped":
        return (1 + module.clip_alpha / scores.shape[-1]) * (torch.exp(2 * delta) - 1)
    if normaliser == "sigmoid":
        return n * delta / 4
    if normaliser == "softpick":
        e = torch.where(visible, torch.exp(scores.double()), torch.zeros((), dtype=torch.float64))
        a = (e * (torch.exp(delta.double()) - 1)).sum(-1, keepdim=True)
        d = torch.where(visible, (e - 1).abs(), torch.zeros((), dtype=torch.float64)).sum(-1, keepdim=True)
        return (2 * a / (d - a).clamp_min(1e-30)).float()
    raise AssertionError(f"no error bound derived for normaliser {normaliser!r}: add one here")


def test_every_normaliser_has_a_derived_bound():
    scores = torch.zeros(1, 1, 2, 2)
    module = QBenchAttention(QBenchConfig(d_model=16, n_head=1, attention="sink_logit", vocab_size=300), 0)
    for name in NORMALISERS:
        assert weights_error(name, scores, torch.zeros(2, 1), module, 0).shape[-1] == 1


def float_and_kernel(arm, probs, seed=0, t=T):
    torch.manual_seed(seed)
    module = QBenchAttention(QBenchConfig(d_model=4 * D, n_head=4, attention=arm, vocab_size=300), 0).eval()
    if hasattr(module, "sink_logit"):
        with torch.no_grad():
            module.sink_logit.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    x = torch.randn(2, t, 4 * D)
    with torch.no_grad():
        v_full = module.v_proj(x)
        q, k, v = module._split(module.q_proj(x)), module._split(module.k_proj(x)), module._split(v_full)
        reference = compose(module.arm, q, k, v, gate=module.gate(x, v_full), module=module)
        got = compose(module.arm, q, k, v, gate=module.gate_of(x), module=module,
                      kernel=LowBitAttention(probs=probs, query_chunk=17))
    return module, x, q, k, v, reference, got


@pytest.mark.parametrize("arm", sorted(ATTENTION_ARMS))
@pytest.mark.parametrize("probs", ["int8", "fp8"])
def test_every_arm_within_bound_of_its_float_reference(arm, probs):
    """Every registered arm through the kernel against its float path (a new arm is checked
    here automatically; a new normaliser needs its bound in `weights_error`).
    Per head and query: (||dP||_1 + 8-bit P) max|V_hat| + ||P_hat||_1 s_v / 2, plus the
    8-bit gate (1/510), for value-read gates its sensitivity to quantized V (sigmoid' <= 1/4
    times ||w_g||_1 s_v / 2), and at the value position the re-quantization of g V (s_v / 2),
    each times ||P_hat||_1.  fp8 e4m3 P has a relative step of 2^-3: 1/16 of p instead of
    1/510 absolute."""
    module, x, q, k, v, reference, got = float_and_kernel(arm, probs)
    for b in range(2):
        for h in range(4):
            qb, kb, vb = q[b, h], k[b, h], v[b, h]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            scores = (qb @ kb.t() / math.sqrt(D)).masked_fill(~causal, float("-inf"))[None, None]
            head = _Head(module, h)
            p_mass = module.arm.normalise(scores, head)[0, 0].sum(-1, keepdim=True)  # ||P_i||_1
            delta = score_delta(qb, kb)
            dp = weights_error(module.arm.normaliser, scores[0, 0], delta, module, h)
            _, s_v = int8_codes(vb, dim=0)
            v_max = vb.abs().amax() + s_v.amax()
            mass = torch.clamp(p_mass + dp, min=1.0)  # bound on ||P_hat_i||_1
            rounding = mass * v_max / 16 if probs == "fp8" else torch.arange(1, T + 1).reshape(-1, 1) / 510 * v_max
            bound = dp * v_max + rounding + mass * s_v / 2 + 1e-5
            if module.arm.gate_source is not None:
                w_norm = module.gate_proj.weight.abs().sum(dim=-1).max() if module.arm.gate_source == "value" else 0
                gate_terms = v_max * (1 / 510 + 0.25 * w_norm * v_max / 127 / 2)
                if module.arm.gate_position == "value":
                    gate_terms = gate_terms + v_max / 127
                bound = bound + mass * gate_terms
            error = (got[b, h] - reference[b, h]).abs()
            assert (error <= bound).all(), (arm, probs, b, h, float((error - bound).max()))


class _Head:
    def __init__(self, module, h):
        self.clip_alpha, self.sigmoid_bias = module.clip_alpha, module.sigmoid_bias
        if hasattr(module, "sink_logit"):
            self.sink_logit = module.sink_logit[h:h + 1]


@pytest.mark.parametrize("arm", sorted(ATTENTION_ARMS))
@pytest.mark.parametrize("probs", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["token", "head"])
def test_vectorised_kernel_equals_the_per_block_reference(arm, probs, granularity):
    """Same numbers as the loop-per-(sequence, head) kernel it replaced (tests/lowbit_reference.py),
    with queries in chunks that do not divide T."""
    from lowbit_reference import ReferenceLowBitAttention

    module, x, q, k, v, _, _ = float_and_kernel(arm, probs)
    with torch.no_grad():
        want = ReferenceLowBitAttention(probs, granularity).attend(module, x, q, k, v)
        got = compose(module.arm, q, k, v, gate=module.gate_of(x), module=module,
                      kernel=LowBitAttention(probs, granularity, query_chunk=17))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernel_runs_stock_llama_attention_through_the_registry():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.quant import quantize

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    x = torch.randint(0, 320, (2, 20))
    reference = model(x).logits
    facts = quantize(model, "w8a8-attn")
    assert facts["lowbit_attention_modules"] == 2 and model.config._attn_implementation == "qbench"
    calls = []

    class Observer:
        def first_column(self, p):
            calls.append(p.shape)

    for layer in model.model.layers:
        layer.self_attn.qbench_hooks = Observer()
    out = model(x).logits
    assert calls == [(2, 4, 20)] * 2  # per layer: P[..., 0] of every sequence and head
    assert torch.isfinite(out).all() and 0 < (out - reference).abs().max() < 0.5


def test_gpt2_conv1d_layers_and_attention_are_quantized():
    from transformers import GPT2Config, GPT2LMHeadModel

    from qbench.quant import quantize

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    x = torch.randint(0, 320, (2, 20))
    reference = model(x).logits
    facts = quantize(model, "w8a8-attn")
    assert facts["quantized_linears"] == 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj per layer
    assert facts["lowbit_attention_modules"] == 2
    out = model(x).logits
    assert torch.isfinite(out).all() and 0 < (out - reference).abs().max() < 0.5


@pytest.mark.parametrize("k", [64, 1024, 2500])
def test_int_matmul_is_exact_on_every_path(k, monkeypatch):
    import qbench.quant.lowbit_attention as kernel

    torch.manual_seed(0)
    a = torch.randint(-128, 128, (40, k), dtype=torch.int8)
    b = torch.full((k, 24), -128, dtype=torch.int8)  # the worst case for the fp32 partial sums
    b[:, ::2] = torch.randint(-128, 128, (k, 12), dtype=torch.int8)
    exact = a.long() @ b.long()
    for units in (True, False):
        monkeypatch.setattr(kernel, "INT8_UNITS", units)
        assert torch.equal(kernel.int_matmul(a, b).long(), exact)


@pytest.mark.slow
def test_the_compiled_kernel_blocks_give_the_eager_kernel_bit_for_bit(monkeypatch):
    """QBENCH_INT8_FUSION=compiled (the default outside tests) fuses the kernel's elementwise
    blocks; every block passes its exactness check here and the kernel's output is unchanged."""
    from qbench.modeling import QBenchConfig
    from qbench.modeling.model import QBenchAttention
    from qbench.quant import int8_fused
    from qbench.quant.lowbit_attention import LowBitAttention

    torch.manual_seed(0)
    module = QBenchAttention(QBenchConfig(d_model=64, n_head=2, attention="vga", max_position_embeddings=80), 0).eval()
    module.qbench_hooks, module.qbench_kernel = None, LowBitAttention(query_chunk=32)
    x = torch.randn(2, 80, 64)
    monkeypatch.setenv("QBENCH_INT8_FUSION", "eager")
    with torch.no_grad():
        eager = module(x)
        monkeypatch.setenv("QBENCH_INT8_FUSION", "compiled")
        monkeypatch.setattr(int8_fused, "_cache", {})
        compiled = module(x)
    assert all(mode == "compiled" for _, mode in int8_fused._cache.values()), int8_fused._cache
    assert len(int8_fused._cache) >= 4 and torch.equal(compiled, eager)


def _c_blocks_or_skip():
    from qbench.quant import attention_native

    lib, why = attention_native.library()
    if lib is None:
        pytest.skip(f"no C attention blocks here: {why}")


GATED = sorted(name for name, arm in ATTENTION_ARMS.items() if arm.gate_source is not None)


@pytest.mark.parametrize("arm,granularity", [(arm, "head") for arm in GATED] + [("vga", "element"), ("vga_out", "element")])
def test_whole_module_in_c_gives_the_eager_kernel_bit_for_bit(arm, granularity, monkeypatch):
    """QBENCH_INT8_FUSION=native (the default outside tests): a gated module's whole kernel
    path (V's codes with the dequantized V the gate reads, the gate's rounding and g V
    re-quantized in one C call, Q and K quantized inside the C blocks from the projection's
    layout) gives the eager kernel's output bit for bit, one gate per head or per channel."""
    from qbench.modeling import QBenchConfig
    from qbench.modeling.model import QBenchAttention
    from qbench.quant import attention_native, int8_fused
    from qbench.quant import lowbit_attention as lowbit

    _c_blocks_or_skip()
    torch.manual_seed(0)
    module = QBenchAttention(QBenchConfig(d_model=64, n_head=2, attention=arm, max_position_embeddings=80,
                                          gate_granularity=granularity), 0).eval()
    with torch.no_grad():
        module.gate_proj.weight.mul_(8)  # gates spread over (0, 1), not all near the init
    module.qbench_hooks, module.qbench_kernel = None, lowbit.LowBitAttention(query_chunk=32)
    x = torch.randn(2, 80, 64)
    monkeypatch.setenv("QBENCH_INT8_FUSION", "eager")
    with torch.no_grad():
        eager = module(x)
        monkeypatch.setenv("QBENCH_INT8_FUSION", "native")
        monkeypatch.setattr(int8_fused, "_cache", {})  # a fresh block lookup, with the blocks left eager:
        monkeypatch.setattr(lowbit, "fused", lambda name, fn, check, device="cpu": (fn, "eager"))  # no compile
        calls = []
        for name in ("value_codes", "gated_value_codes"):
            real = getattr(attention_native, name)
            monkeypatch.setattr(attention_native, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
        native = module(x)
    spec = ATTENTION_ARMS[arm]
    assert calls == ["value_codes"] + (["gated_value_codes"] if spec.gate_position == "value" else [])
    assert torch.equal(native, eager)


def test_c_scores_skip_only_hidden_keys_whose_scores_are_finite(monkeypatch):
    """The C score block writes -inf for hidden keys without their products only where the
    score is finite (finite + -inf = -inf): a NaN query row, and scales whose product
    overflows float32, give the torch block's NaN and +-inf there too; near-tie Q and K rows
    quantize as int8_codes does."""
    from qbench.quant import attention_native
    from test_int8_native import near_ties

    _c_blocks_or_skip()
    g = torch.Generator().manual_seed(2)
    q = near_ties(2 * 2 * 160, 32, 6).reshape(2, 160, 2, 32).transpose(1, 2)  # the projection's layout
    k = near_ties(2 * 2 * 160, 32, 7).reshape(2, 2, 160, 32)
    q[0, 0, 10] = float("nan")  # its hidden keys 64..159 are whole skippable groups but for the NaN
    q[1, 1, :20] *= 1e30  # s_q s_k overflows to inf: inf * S = +-inf (NaN at S = 0), + -inf = NaN
    k[1, 1, 64:] *= 1e30
    q[1, 0, :20] *= 1e18  # s_q s_k finite, S s_q s_k overflows for some keys
    k[1, 0, 64:] *= 1e18
    v_codes, v_scale = int8_codes(torch.randn(2, 2, 160, 32, generator=g), -2)
    bias = causal_bias(160, 160, "cpu")
    monkeypatch.setenv("QBENCH_INT8_FUSION", "eager")
    scores_of, _ = LowBitAttention()._torch_chunk_blocks(q, k, v_codes, v_scale, 0.125)
    want = scores_of(0, 160, bias)
    monkeypatch.setenv("QBENCH_INT8_FUSION", "native")
    got = attention_native.Packed(k, v_codes, v_scale).scores(q, 0.125, bias)
    for h in (0, 1):  # the cases are hit: NaN where a hidden key's score overflowed
        assert want[1, h, :20, 64:].isnan().any()
    assert want[0, 0, 10].isnan().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_c_gated_value_codes_equal_the_eager_blocks_bit_for_bit():
    """round(255 g) / 255 (codes * scale) re-quantized per channel, in C, equals the torch
    blocks: gates on and beside the halves of 1/255, one per (token, head) or per channel,
    strided as the gate's projection leaves them, on V's codes of near_ties values (the
    re-quantization is value_codes' per-channel routine, tested on ties below); a NaN gate
    makes its head's scales NaN."""
    from qbench.quant import attention_native
    from test_int8_native import near_ties

    _c_blocks_or_skip()
    g = torch.Generator().manual_seed(5)
    ties = near_ties(64, 96, 3).t().reshape(96, 2, 2, 16).permute(1, 2, 0, 3).contiguous()  # (B, H, T, D)
    v_codes, v_scale = int8_codes(ties, -2)
    halves = (torch.arange(96, dtype=torch.float32) + 0.5) / 255  # round(255 g) ties
    per_head = torch.rand(2, 96, 2, 1, generator=g).transpose(1, 2)  # the projection's (B, T, H, 1) layout
    per_head[0, 0, :, 0] = halves
    per_head[1, 1, :, 0] = torch.nextafter(halves, torch.ones(()))
    per_channel = torch.rand(2, 96, 2, 16, generator=g).transpose(1, 2)
    per_channel[0, 1, :, 3] = halves
    for gate in (per_head, per_channel, per_head.contiguous(), torch.ones(2, 2, 96, 1)):
        want = int8_codes(quantize_gate(gate) * (v_codes.float() * v_scale), -2)
        got = attention_native.gated_value_codes(gate, v_codes, v_scale)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), tuple(gate.stride())
    nan_gate = per_head.clone()
    nan_gate[1, 0, 7, 0] = float("nan")
    scale = attention_native.gated_value_codes(nan_gate, v_codes, v_scale)[1]
    assert torch.isnan(scale[1, 0]).all() and torch.isnan(scale).sum() == 16


@pytest.mark.parametrize("arm", sorted(ATTENTION_ARMS))
def test_c_blocks_give_the_eager_kernel_bit_for_bit(arm, monkeypatch):
    """QBENCH_INT8_FUSION=native (the default outside tests) with AVX-512 VNNI: the two int8
    GEMMs and their blocks run in C (qbench.quant.attention_native); every arm's output and
    the P[..., 0] the probes see equal the eager kernel's, bit for bit, with two sequences,
    query chunks and key counts that are no multiple of 16 (or of 4), and a padding mask."""
    from qbench.quant import attention_native
    from qbench.quant import lowbit_attention as lowbit

    _c_blocks_or_skip()
    torch.manual_seed(0)
    module = QBenchAttention(QBenchConfig(d_model=64, n_head=2, attention=arm, max_position_embeddings=80), 0).eval()
    x = torch.randn(2, 37, 64) * 2
    q, k, v = module._split(module.q_proj(x)), module._split(module.k_proj(x)), module._split(module.v_proj(x))
    hidden = torch.zeros(2, 1, 37, 37, dtype=torch.bool)
    hidden[1, ..., :5] = True  # the second sequence's first 5 keys are padding
    hidden |= torch.triu(torch.ones(37, 37, dtype=torch.bool), diagonal=1)

    class Observer:
        def __init__(self):
            self.first = []

        def scores(self, s): return s
        def probs(self, p): return p
        def context(self, c): return c

        def first_column(self, p):
            self.first.append(p)

    calls = []
    real = attention_native.Packed.scores
    monkeypatch.setattr(attention_native.Packed, "scores", lambda self, *a: calls.append(1) or real(self, *a))
    results = {}
    for mode in ("eager", "native"):
        monkeypatch.setenv("QBENCH_INT8_FUSION", mode)
        for name, call_hidden in (("causal", None), ("padded", hidden)):
            observer = Observer()
            with torch.no_grad():
                out = lowbit.LowBitAttention(query_chunk=16).weighted_sum(
                    q, k, *lowbit.LowBitAttention().quantize_values(v), module.arm.normalise, module, 0.125,
                    call_hidden, observer)
            results[mode, name] = out, torch.cat(observer.first)
    assert len(calls) == 2 * 3  # the C blocks ran: 3 chunks of 16 queries, twice
    for name in ("causal", "padded"):  # bit for bit; the padded queries that see no key have NaN weights
        for got, want in zip(results["native", name], results["eager", name]):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)


def test_c_blocks_serve_only_what_they_compute(monkeypatch):
    """fp8 P, one scale per head, or a head width that is no multiple of 16: the torch blocks."""
    from qbench.quant import lowbit_attention as lowbit

    _c_blocks_or_skip()
    monkeypatch.setenv("QBENCH_INT8_FUSION", "native")
    q, v_codes = torch.randn(1, 2, 8, 16), torch.zeros(1, 2, 8, 16, dtype=torch.int8)
    assert LowBitAttention()._c_blocks(q, v_codes)
    assert not LowBitAttention(probs="fp8")._c_blocks(q, v_codes)
    assert not LowBitAttention(qkv_granularity="head")._c_blocks(q, v_codes)
    assert not LowBitAttention()._c_blocks(torch.randn(1, 2, 8, 24), torch.zeros(1, 2, 8, 24, dtype=torch.int8))
    assert not LowBitAttention()._c_blocks(q.double(), v_codes)
    monkeypatch.setenv("QBENCH_INT8_FUSION", "compiled")
    assert not lowbit._c_blocks_available(q, v_codes)


def test_c_value_codes_equal_int8_codes_bit_for_bit():
    """V's per-channel codes from C (x * (1/s), the exact division near every tie) equal
    int8_codes(v, -2): values built on and 1-4 ulps around every k + 0.5 over many binades,
    in the projection's (B, T, H, D) layout and a contiguous one; a NaN channel's scale is NaN."""
    from qbench.quant import attention_native
    from test_int8_native import near_ties

    _c_blocks_or_skip()
    ties = near_ties(64, 96, 3).t().reshape(96, 2, 2, 16).permute(1, 2, 0, 3)  # (B, H, T, D): ties down T
    projection = torch.randn(2, 33, 3 * 32, generator=torch.Generator().manual_seed(4)) * 5
    viewed = projection.view(2, 33, 6, 16).transpose(1, 2)[:, 2:4]  # strided (B, H, T, D) rows
    for v in (ties.contiguous(), ties, viewed, torch.zeros(1, 1, 5, 16)):
        want, got = int8_codes(v, -2), attention_native.value_codes(v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), tuple(v.shape)
    v = torch.randn(1, 2, 9, 32)
    v[0, 1, 4, 20] = float("nan")
    scale = attention_native.value_codes(v)[1]
    assert torch.isnan(scale[0, 1, 0, 20]) and torch.isnan(scale).sum() == 1
    assert torch.isnan(int8_codes(v, -2)[1][0, 1, 0, 20])


def test_the_record_says_which_attention_blocks_ran(monkeypatch):
    """`quantization.lowbit_attention_blocks`: "c" where the C blocks serve the model's heads,
    else "torch (why)"; the stock Llama heads (width 16) and ours alike."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.quant import attention_native, quantize

    monkeypatch.setenv("QBENCH_INT8_FUSION", "native")
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    facts = quantize(LlamaForCausalLM(config).eval(), "w8a8-attn")
    lib, why = attention_native.library()
    assert facts["lowbit_attention_blocks"] == ("c" if lib is not None else f"torch ({why})")
    narrow = LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if lib is not None:
        assert quantize(LlamaForCausalLM(narrow).eval(), "w8a8-attn")["lowbit_attention_blocks"] == \
            "torch (head width 12)"
    monkeypatch.setenv("QBENCH_INT8_FUSION", "eager")
    assert quantize(LlamaForCausalLM(config).eval(), "w8a8-attn")["lowbit_attention_blocks"] == \
        "torch (QBENCH_INT8_FUSION=eager, cpu)"
