"""Every arm against a direct, loop-based implementation of its formula (REFERENCE.md 1-2)."""
import math

import pytest
import torch

from qbench.modeling import ATTENTION_ARMS, QBenchConfig
from qbench.modeling.attention import ATTENTION_ARMS as ARMS, clipped_softmax, softpick
from qbench.modeling.compose import compose
from qbench.modeling.model import QBenchAttention

B, T, D_MODEL, H = 2, 6, 8, 2
DH = D_MODEL // H


def naive_weights(arm: str, scores: torch.Tensor, module: QBenchAttention, h: int, alpha: float) -> torch.Tensor:
    """One query's weights over its visible keys, straight from each paper's formula."""
    if arm == "clipped":
        gamma = -alpha / T
        return torch.clamp((1 - gamma) * torch.softmax(scores, dim=0) + gamma, 0, 1)
    if arm == "softpick":  # Zuhri et al.: ReLU(e^x - 1) / (sum |e^x - 1| + eps), unshifted
        e = torch.exp(scores.double()) - 1
        m = scores.max().double()  # their eps sits after the shift by the row max: eps * e^m here
        return (torch.relu(e) / (e.abs().sum() + 1e-8 * torch.exp(m))).float()
    if arm == "sigmoid":  # Ramapuram et al.: sigmoid(s - log n), n the context length
        return torch.sigmoid(scores - math.log(module_context(module)))
    if arm == "sink_logit":  # exp(s_j) / (exp(sink_h) + sum_j exp(s_j))
        e = torch.exp(scores.double())
        return (e / (math.exp(float(module.sink_logit[h])) + e.sum())).float()
    return torch.softmax(scores, dim=0)


def module_context(module: QBenchAttention) -> int:
    return round(math.exp(-module.sigmoid_bias))


def naive_attention(module: QBenchAttention, x: torch.Tensor, arm: str, alpha: float = 4.0) -> torch.Tensor:
    """Token by token, head by head, straight from the formulas."""
    def lin(layer, inp):
        return inp @ layer.weight.T + layer.bias

    q, k, v = lin(module.q_proj, x), lin(module.k_proj, x), lin(module.v_proj, x)  # (B, T, d)
    out = torch.zeros(B, T, D_MODEL)
    for b in range(B):
        for h in range(H):
            sl = slice(h * DH, (h + 1) * DH)
            for i in range(T):
                scores = torch.tensor([float(q[b, i, sl] @ k[b, j, sl]) / math.sqrt(DH) for j in range(i + 1)])
                weights = naive_weights(arm, scores, module, h, alpha)

                def gate(t):  # one scalar per head per token
                    if arm in ("vga", "vga_out"):  # from the token's full value vector
                        z = v[b, t] @ module.gate_proj.weight[h] + module.gate_proj.bias[h]
                    elif arm == "iga":  # from the head's slice of the input
                        z = x[b, t, sl] @ module.gate_proj.weight[h, :, 0] + module.gate_proj.bias[h, 0]
                    elif arm in ("qwen_g1", "vga_x"):  # from the whole input
                        z = x[b, t] @ module.gate_proj.weight[h] + module.gate_proj.bias[h]
                    else:
                        return 1.0
                    return torch.sigmoid(z)

                if arm in ("vga", "vga_x"):  # key side: each value scaled by its own token's gate
                    o = sum(weights[j] * gate(j) * v[b, j, sl] for j in range(i + 1))
                else:  # output side (or no gate): the query token's gate scales the output
                    o = gate(i) * sum(weights[j] * v[b, j, sl] for j in range(i + 1))
                out[b, i, sl] = o
    return lin(module.o_proj, out)


@pytest.mark.parametrize("arm", sorted(ATTENTION_ARMS))
def test_arm_matches_naive_formula(arm):
    torch.manual_seed(0)
    config = QBenchConfig(d_model=D_MODEL, n_head=H, n_layer=1, d_ff=16, attention=arm, vocab_size=300,
                          max_position_embeddings=16)
    module = QBenchAttention(config, 0)
    for p in module.parameters():  # larger than init so gates, scores and sink logits matter
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(B, T, D_MODEL)
    with torch.no_grad():
        got = module(x)
        want = naive_attention(module, x, arm, alpha=config.clip_alpha)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arm", [a for a in sorted(ATTENTION_ARMS) if ATTENTION_ARMS[a].normaliser == "softmax"])
def test_fused_and_eager_paths_agree(arm):
    """The SDPA path (no hooks) and the explicit scores/probs path compute the same thing."""
    class Identity:
        def scores(self, s): return s
        def probs(self, p): return p
        def context(self, c): return c

    torch.manual_seed(1)
    config = QBenchConfig(d_model=D_MODEL, n_head=H, n_layer=1, d_ff=16, attention=arm, vocab_size=300)
    module = QBenchAttention(config, 0)
    x = torch.randn(B, T, D_MODEL)
    fused = module(x)
    module.qbench_hooks = Identity()
    torch.testing.assert_close(module(x), fused, atol=1e-6, rtol=1e-5)


def test_clipped_softmax_reaches_exact_zero():
    scores = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    probs = clipped_softmax(scores, alpha=4.0)  # T = 4, gamma = -1: (1 + 1) p - 1, clipped
    assert probs[0, 1:].eq(0).all()  # small probabilities are clipped to exactly 0
    p0 = torch.softmax(scores, dim=-1)[0, 0]
    torch.testing.assert_close(probs[0, 0], 2 * p0 - 1)


def _gated_value_gradients(attention_fn, closed_tokens):
    """Gradient of the attention output w.r.t. each token's value, gates from V (Eq. 6)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, T, DH), torch.randn(1, 1, T, DH)
    v = torch.randn(1, 1, T, DH, requires_grad=True)
    w_g = torch.randn(DH, 1)
    bias = torch.zeros(T, 1)
    bias[closed_tokens] = -60.0  # sigmoid(-60) ~ 1e-26: the gate is closed
    gate = torch.sigmoid(v @ w_g + bias)  # (1, 1, T, 1), computed from V as in VGA
    attention_fn(q, k, v, gate).sum().backward()
    return v.grad[0, 0].norm(dim=-1)  # (T,)


def test_vga_closed_gate_stops_gradient_into_value():
    """d(g_j V_j)/dV_j = g_j I + V_j (g_j (1 - g_j) w_g)^T -> 0 as g_j -> 0."""
    grads = _gated_value_gradients(lambda q, k, v, g: compose(ARMS["vga"], q, k, v, gate=g), closed_tokens=[0])
    assert grads[0] < 1e-20
    assert (grads[1:] > 1e-3).all()  # open gates pass gradient


def test_output_side_gate_does_not_stop_gradient_into_sink_value():
    """vga_out gates the query's output, so V_0 still receives gradient from later queries:
    the gradient argument holds only for the key-side form."""
    grads = _gated_value_gradients(lambda q, k, v, g: compose(ARMS["vga_out"], q, k, v, gate=g), closed_tokens=[0])
    assert grads[0] > 1e-3


def test_softpick_matches_the_definition_and_can_put_mass_nowhere():
    """Unshifted definition with eps scaled as theirs; all-negative rows give all zeros,
    hidden keys (-inf) count neither in the numerator nor in the denominator."""
    x = torch.tensor([[0.5, -1.0, 2.0, float("-inf")], [-0.3, -2.0, -1.0, float("-inf")]])
    e = torch.exp(x[:, :3].double()) - 1
    want = torch.relu(e) / (e.abs().sum(-1, keepdim=True) + 1e-8 * torch.exp(x[:, :3].amax(-1, keepdim=True).double()))
    got = softpick(x)
    torch.testing.assert_close(got[:, :3].double(), want, rtol=1e-6, atol=1e-7)
    assert got[:, 3].eq(0).all() and got[1].eq(0).all()


@pytest.mark.parametrize("arm", ["sink_logit", "sigmoid", "softpick"])
def test_non_softmax_rows_need_not_sum_to_one(arm):
    """The point of these normalisers: a head may put (almost) no mass anywhere."""
    torch.manual_seed(0)
    config = QBenchConfig(d_model=D_MODEL, n_head=H, n_layer=1, d_ff=16, attention=arm, vocab_size=300)
    module = QBenchAttention(config, 0)
    scores = torch.full((1, H, 3, 3), -4.0).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    if arm == "sink_logit":
        with torch.no_grad():
            module.sink_logit.fill_(4.0)
    rows = ARMS[arm].normalise(scores, module).sum(-1)
    assert (rows < 0.05).all()
