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
from qbench.modeling.model import QBenchAttention
from qbench.quant.lowbit_attention import LowBitAttention, int8_codes

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
    v_codes, v_scale = int8_codes(v, dim=0)
    got = kernel.block(q, k, v_codes, v_scale, 1 / math.sqrt(D), None, None)
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


@pytest.mark.parametrize("arm", sorted(ATTENTION_ARMS))
@pytest.mark.parametrize("probs", ["int8", "fp8"])
def test_every_arm_within_bound_of_its_float_reference(arm, probs):
    torch.manual_seed(0)
    module = QBenchAttention(QBenchConfig(d_model=4 * D, n_head=4, attention=arm, vocab_size=300), 0).eval()
    x = torch.randn(2, T, 4 * D)
    with torch.no_grad():
        v_full = module.v_proj(x)
        q, k, v = module._split(module.q_proj(x)), module._split(module.k_proj(x)), module._split(v_full)
        reference = module.arm.function(q, k, v, module.gate(x, v_full), clip_alpha=module.clip_alpha)
        got = LowBitAttention(probs=probs).attend(module, x, q, k, v, v_full)
    # Per head: the block bound, plus the 8-bit gate (1/510) and, for VGA, the gate's
    # sensitivity to quantized V (sigmoid' <= 1/4 times ||w_g||_1 s_v / 2) and the
    # re-quantization of g V (s_v / 2).  fp8 e4m3 P has a relative step of 2^-3: 1/16 of p
    # instead of 1/510 absolute, i.e. ||dP||_1 <= 1/16.
    for b in range(2):
        for h in range(4):
            bound = block_bound(q[b, h], k[b, h], v[b, h])
            v_max = v[b, h].abs().amax()
            if probs == "fp8":
                bound = bound + v_max / 16
            if arm == "clipped":  # clip(2p-1)-style map: Lipschitz (1 + alpha/T) in p
                bound = bound * (1 + module.clip_alpha / T) + v_max * module.clip_alpha / T
            if module.arm.gate_source is not None:
                w_norm = module.gate_proj.weight.abs().sum(dim=-1).max() if module.arm.gate_source == "value" else 0
                bound = bound + v_max * (1 / 510 + 0.25 * w_norm * v_max / 127 / 2) + v_max / 127
            assert ((got[b, h] - reference[b, h]).abs() <= bound).all(), (arm, probs, b, h)


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
    kernel = model.model.layers[0].self_attn.qbench_kernel
    kernel.observer = lambda module, head, p: calls.append(p.shape)
    out = model(x).logits
    assert len(calls) == 2 * 2 * 4 and calls[0] == (20, 20)  # layers x batch x heads, one T x T block each
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
