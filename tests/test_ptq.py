"""Outlier-aware post-training methods (issue 15), each against its paper's definition:
SmoothQuant and the Hadamard rotation leave the float model unchanged; GPTQ is the
paper's column-by-column algorithm and beats RTN on correlated inputs; AWQ's search never
does worse than RTN on its calibration data; HQQ's weights lie on a 4-bit affine grid."""
from __future__ import annotations

import sys

import pytest
import torch

from qbench.modeling.attention import ATTENTION_ARMS
from qbench.modeling.config import QBenchConfig
from qbench.modeling.model import QBenchForCausalLM

NEW_SCHEMES = ["w8a8-sq", "w8a8-pt-sq", "w8a8-had", "w8a8-pt-had", "w4a8-had", "w4-gptq-g128", "w4-awq-g128",
               "w4-hqq-g64"]


def _random_model(arm: str, seed: int = 0) -> QBenchForCausalLM:
    torch.manual_seed(seed)
    config = QBenchConfig(d_model=64, n_head=4, n_layer=2, d_ff=128, attention=arm, vocab_size=300,
                          max_position_embeddings=32)
    model = QBenchForCausalLM(config).double().eval()
    with torch.no_grad():  # trained-looking norms and gates: far from their init values
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) * 2 + 0.1)
            elif "norm" in name or "gate" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 2 + 0.1)
    return model


def _batches(n=3, seed=1, vocab=300, length=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, length), generator=g) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# In float64 the transforms are exact up to a few roundings per layer (relative 1e-15 each):
# a difference above 1e-9 of the logits' scale is an error in the transform, not rounding.
TOL = 1e-9


@pytest.mark.parametrize("arm", list(ATTENTION_ARMS))
def test_smoothquant_leaves_the_float_model_unchanged(arm):
    from qbench.quant.smoothquant import smooth

    model = _random_model(arm)
    ids = _batches(1, seed=7)[0]
    before = _logits(model, ids)
    facts = smooth(model, _batches(), alpha=0.5)
    assert facts["smoothed_norms"] == 4
    after = _logits(model, ids)
    assert (after - before).abs().max() <= TOL * before.abs().max()
    assert not torch.allclose(model.model.layers[0].attn_norm.weight, torch.ones(64, dtype=torch.float64))


def test_smoothquant_scales_follow_the_paper():
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), maxima over all readers of the norm."""
    from qbench.quant.smoothquant import smoothing_scales

    act = torch.tensor([1.0, 100.0, 4.0])
    w1 = torch.nn.Linear(3, 2)
    w2 = torch.nn.Linear(3, 2)
    with torch.no_grad():
        w1.weight.copy_(torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.3]]))
        w2.weight.copy_(torch.tensor([[4.0, 0.1, 0.1], [0.0, 0.0, 0.0]]))
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    expected = torch.tensor([1.0 ** 0.5 / 4.0 ** 0.5, 100.0 ** 0.5 / 2.0 ** 0.5, 4.0 ** 0.5 / 1.0 ** 0.5])
    torch.testing.assert_close(s, expected)
    # alpha 1: all the difficulty moves to the weights (s = max|X|)
    torch.testing.assert_close(smoothing_scales(act, [w1, w2], alpha=1.0), act)


def test_smoothquant_shrinks_an_outlier_channel_at_the_norm_output():
    from qbench.quant.smoothquant import activation_maxima, smooth

    model = _random_model("softmax")
    with torch.no_grad():
        model.model.layers[0].attn_norm.weight[5] = 60.0  # a massive channel, as in real LMs
    norm = {"n": model.model.layers[0].attn_norm}
    before = activation_maxima(model, norm, _batches())["n"]
    smooth(model, _batches(), alpha=0.5)
    after = activation_maxima(model, norm, _batches())["n"]
    ratio_before = before.max() / before.median()
    ratio_after = after.max() / after.median()
    assert ratio_after < ratio_before / 3


@pytest.mark.parametrize("arm", list(ATTENTION_ARMS))
def test_rotation_leaves_the_float_model_unchanged(arm):
    from qbench.quant.rotation import rotate

    model = _random_model(arm)
    ids = _batches(1, seed=7)[0]
    before = _logits(model, ids)
    facts = rotate(model, seed=3)
    assert facts["mean_free_stream"] and facts["width"] == 64
    after = _logits(model, ids)
    assert (after - before).abs().max() <= TOL * before.abs().max()


@pytest.mark.parametrize("tied", [True, False])
def test_smoothquant_and_rotation_on_a_llama_family_model(tied):
    from qbench.quant.rotation import rotate
    from qbench.quant.smoothquant import smooth

    ids = _batches(1, seed=7)[0]
    for transform in (lambda m: smooth(m, _batches(), 0.5), lambda m: rotate(m, seed=1)):
        model = _llama(tied)
        before = _logits(model, ids)
        transform(model)
        after = _logits(model, ids)
        # Llama's RMSNorm computes in float32 even in a float64 model: float32 rounding, 2^-24
        # per operation, through 2 layers
        assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_rotation_spreads_a_massive_residual_channel():
    """What the quantizer sees: one channel of the stream 100x the rest becomes flat."""
    from qbench.quant.rotation import rotate

    model = _random_model("softmax")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] += 100.0
        model.model.embed_tokens.weight[:, 8] -= 100.0  # stays mean-free per row: survives centring

    def peak_ratio(m):
        with torch.no_grad():
            h = m.model.embed_tokens(_batches(1)[0]).abs()
        return float(h.amax() / h.mean())

    before = peak_ratio(model)
    rotate(model, seed=0)
    assert peak_ratio(model) < before / 5


def test_rotations_of_different_seeds_differ_and_are_orthogonal():
    from torchao.prototype.spinquant.hadamard_utils import random_hadamard_matrix

    a, b = random_hadamard_matrix(64, "cpu", seed=0).double(), random_hadamard_matrix(64, "cpu", seed=1).double()
    torch.testing.assert_close(a @ a.t(), torch.eye(64, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.allclose(a, b)


def test_unsupported_models_get_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from qbench.quant.rotation import rotate
    from qbench.quant.structure import UnsupportedModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModel, match="Conv1D .*linearize_conv1d"):  # quantize() linearizes first
        rotate(model)
    with pytest.raises(UnsupportedModel, match=r"model type 'bert'.* none of the described layouts"):
        rotate(torch.nn.Module.__new__(type("Bert", (torch.nn.Module,), {"config": type("C", (), {
            "model_type": "bert"})()})))


# GPTQ ---------------------------------------------------------------------------------------

def _paper_gptq(weight, hessian, bits, group, percdamp=0.01):
    """Algorithm 1 of the paper, one column at a time with no lazy batching."""
    from qbench.quant.gptq import group_params, inverse_hessian_factor, quantize_column

    w = weight.double().clone()
    u = inverse_hessian_factor(hessian, w, percdamp)  # Cholesky(H^-1)^T, upper
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % group == 0:
            scale, zero = group_params(w[:, j:j + group], bits)
        q[:, j] = quantize_column(w[:, j], scale, zero, bits)
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)
    return q


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)


def test_gptq_is_the_papers_algorithm():
    from qbench.quant.gptq import gptq_quantize

    torch.manual_seed(0)
    w = torch.randn(24, 256, dtype=torch.float64)
    x = _correlated_inputs(512, 256)
    h = 2 * x.t() @ x / x.shape[0]
    ours = gptq_quantize(w, h, bits=4, group_size=64, block_size=128)
    reference = _paper_gptq(w, h, 4, 64)
    # lazy batches reorder float64 sums (grid scales differ in the last bits); a different
    # rounding decision (a tie to 1e-12) would show as a whole grid step: allow 0.1% of those
    assert ((ours - reference).abs() > 1e-9).double().mean() < 1e-3
    assert torch.allclose(ours, reference, atol=1e-9, rtol=0) or ((ours - reference).abs() > 1e-9).sum() <= 5


def test_gptq_without_input_correlation_is_rtn():
    """H = c I: the inverse factor is diagonal, no error is propagated, GPTQ = RTN."""
    from qbench.quant.gptq import gptq_quantize
    from qbench.quant.grid import quantize_weight

    torch.manual_seed(0)
    w = torch.randn(16, 256)
    ours = gptq_quantize(w, 3.0 * torch.eye(256, dtype=torch.float64), bits=4, group_size=128)
    rtn = quantize_weight(w, 4, "group", 128, symmetric=False)
    # GPTQ works in float64, quantize_weight in float32: grid scales agree to float32 rounding
    torch.testing.assert_close(ours, rtn, atol=1e-6, rtol=0)


def test_gptq_reconstructs_layer_outputs_better_than_rtn():
    from qbench.quant.gptq import gptq_quantize
    from qbench.quant.grid import quantize_weight

    torch.manual_seed(1)
    w = torch.randn(64, 256, dtype=torch.float64)
    x = _correlated_inputs(2048, 256, seed=1)
    h = 2 * x.t() @ x / x.shape[0]
    gptq = gptq_quantize(w, h, bits=4, group_size=128)
    rtn = quantize_weight(w, 4, "group", 128, symmetric=False).double()
    err = lambda q: (x @ (w - q).t()).pow(2).sum()  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn)


# AWQ / HQQ ---------------------------------------------------------------------------------------

def test_awq_never_does_worse_than_rtn_on_its_calibration_data():
    """The grid contains r = 0 (s = 1, i.e. RTN), so the chosen scales' output error on the
    calibration inputs is at most RTN's; with a few salient channels it is clearly lower."""
    from qbench.quant.awq import awq_weights
    from qbench.quant.grid import quantize_weight

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 32, bias=False)
    x = torch.randn(4, 64, 256) * torch.where(torch.arange(256) % 37 == 0, 20.0, 1.0)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, input_ids):
            return self.lin(input_ids)

    model = One()
    weights, tokens = awq_weights(model, [("lin", lin)], [x], bits=4, group_size=128)
    assert tokens == x.numel()
    flat = x.reshape(-1, 256)
    rtn = quantize_weight(lin.weight, 4, "group", 128, symmetric=False)
    err = lambda q: (flat @ (lin.weight - q).t()).pow(2).mean().item()  # noqa: E731
    assert err(weights["lin"]) < 0.9 * err(rtn)


def test_hqq_weights_lie_on_a_4bit_affine_grid_per_group():
    from qbench.quant.hqq import hqq_weight
    from qbench.quant.grid import quantize_weight

    torch.manual_seed(0)
    w = torch.randn(32, 256)
    q = hqq_weight(w, bits=4, group_size=64)
    assert q.shape == w.shape and not torch.equal(q, quantize_weight(w, 4, "group", 64, symmetric=False))
    for group in q.reshape(-1, 64):
        levels = torch.unique(group)
        assert len(levels) <= 16
        steps = torch.diff(levels)
        step = steps.min()
        # every gap is a whole number of grid steps (float32 rounding of s * (q - z))
        assert torch.allclose(steps / step, torch.round(steps / step), atol=1e-3)
    assert (q - w).pow(2).mean() < 0.02  # a 4-bit grid on unit Gaussians: RTN's error is ~0.0083


def test_a_missing_optional_package_is_named(monkeypatch):
    from qbench.quant.hqq import hqq_weight

    monkeypatch.setitem(sys.modules, "hqq", None)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    with pytest.raises(ImportError, match="pip install 'hqq"):
        hqq_weight(torch.randn(4, 64))


# end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro128(tmp_path_factory, small_corpus, micro_preset):
    """The micro recipe at width 128 (so groups of 128 fit every linear), with a value gate."""
    from dataclasses import replace

    from qbench.train import train

    out = tmp_path_factory.mktemp("ckpt") / "micro-vga-128"
    train("vga", replace(micro_preset, d_model=128, d_ff=256), seed=0, out=out, corpus=str(small_corpus),
          progress=False)
    return out


def test_new_schemes_are_listed_and_run_from_bench(micro128, tmp_path):
    from qbench.runner import run_bench
    from qbench.quant import SCHEMES
    from qbench.results import ResultStore

    assert set(NEW_SCHEMES) <= set(SCHEMES)
    records = run_bench([str(micro128)], NEW_SCHEMES + ["fp32"], ["ppl"], ResultStore(tmp_path / "results"),
                        limit=2000, progress=False)
    by_scheme = {r["scheme"]: r for r in records}
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    fp32 = by_scheme["fp32"]["metrics"]["ppl"]
    for name in NEW_SCHEMES:  # 8-bit and 4-bit grids on a 2-layer model: far inside a factor of 2
        assert 0.5 * fp32 < by_scheme[name]["metrics"]["ppl"] < 2 * fp32, name
    assert by_scheme["w8a8-pt-sq"]["quantization"]["transform"] == "smoothquant"
    assert by_scheme["w8a8-pt-sq"]["calibration_seed"] == 0
    assert by_scheme["w8a8-had"]["quantization"]["rotation_seed"] == 0
    assert by_scheme["w4-gptq-g128"]["quantization"]["calibration_tokens"] > 0
    assert by_scheme["w4-hqq-g64"]["quantization"]["weight_method"] == "hqq"


def test_new_schemes_run_through_the_lm_eval_model_and_are_listed(micro128, capsys):
    from qbench.cli import main
    from qbench.integrations.lm_eval import QBenchLM

    lm = QBenchLM(model=str(micro128), scheme="w8a8-pt-had", calibration_seed=2)
    assert lm.qbench_quantization["transform"] == "hadamard" and lm.qbench_quantization["rotation_seed"] == 2
    assert main(["list", "schemes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in NEW_SCHEMES)


def test_a_group_size_that_does_not_divide_a_layer_fails_before_calibrating():
    from qbench.quant import get_scheme
    from qbench.quant.weight_only import prepare_weight_only

    model = _random_model("softmax")  # width 64: groups of 128 cannot fit
    # no calibration: had the check come after calibration, the error would be "pass calibration batches"
    with pytest.raises(ValueError, match="groups of 128 do not divide the input width"):
        prepare_weight_only(model, get_scheme("w4-gptq-g128"), calibration=None)


@pytest.mark.parametrize("family", ["qbench", "llama"])
def test_transformed_static_schemes_quantize_the_same_sites_as_the_plain_one(family):
    """The folded norms stay norms to the w8a8-pt protocol: rotation and smoothing change
    what the quantizers see, never how many there are."""
    import copy

    from qbench.quant import get_scheme, quantize

    base = _random_model("vga").float() if family == "qbench" else _llama().float()

    def calibration(n, seed, batch_size):
        return _batches(n, seed)

    sites = {}
    for name in ("w8a8-pt", "w8a8-pt-had", "w8a8-pt-sq", "w4a8", "w4a8-had"):
        sites[name] = quantize(copy.deepcopy(base), get_scheme(name), calibration)["sites"]
    assert sites["w8a8-pt"]["norm outputs"] > 0
    assert sites["w8a8-pt-had"] == sites["w8a8-pt-sq"] == sites["w8a8-pt"] and sites["w4a8-had"] == sites["w4a8"]
