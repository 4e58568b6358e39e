"""Each probe against a hand-made case with a known answer."""
import pytest
import torch

from qbench.modeling import QBenchConfig, QBenchForCausalLM
from qbench.probes import run_probes
from qbench.probes.stats import ActivationProbe, AttentionProbe

D, T, LAYERS = 64, 32, 4


def model(arm="softmax"):
    torch.manual_seed(0)
    return QBenchForCausalLM(QBenchConfig(vocab_size=320, n_layer=LAYERS, n_head=2, d_model=D, d_ff=128,
                                          attention=arm, max_position_embeddings=T)).eval()


class Fixed(torch.nn.Module):
    def __init__(self, tensor):
        super().__init__()
        self.tensor = tensor

    def forward(self, x):
        return self.tensor.expand(x.shape[0], -1, -1)


def windows(n=4):
    torch.manual_seed(1)
    return [torch.randint(3, 320, (T,)) for _ in range(n)]


def test_kurtosis_and_max_norm_of_known_tensors():
    m = model()
    signs = (torch.arange(T * D) % 2 * 2 - 1).float().reshape(1, T, D)  # balanced +-1: mean 0, kurtosis 1
    for layer in m.model.layers:
        layer.attn_norm = Fixed(signs * 3.0)
    probe = ActivationProbe(m)
    with probe, torch.no_grad():
        for w in windows():
            m(w[None])
    per_site = {k: v / probe.samples for k, v in probe.kurt_sum.items()}
    assert per_site[(0, "attn_input")] == pytest.approx(81 / (81 + 1e-6), rel=1e-6)  # E x^4 / (sigma^4 + 1e-6)
    assert probe.max_sum[(2, "attn_input")] / probe.samples == pytest.approx(3.0)


def test_planted_outlier_feature_is_found_in_every_layer():
    m = model()
    planted = torch.randn(1, T, D) * 0.5
    planted[0, : T // 5, 7] = 10.0  # dimension 7: |x| >= 6 at 20% of positions (>= 6%)
    planted[0, 0, 9] = 10.0  # dimension 9: one position (3%): not an outlier feature
    for layer in m.model.layers:
        layer.mlp_norm = Fixed(planted)
    result = run_probes(m, windows())
    assert result["outlier_feature_dims"] == [7]
    assert result["outlier_count_6"] >= LAYERS * (T // 5 + 1)


def test_massive_activation_needs_both_thresholds():
    probe = ActivationProbe(model())
    x = torch.full((1, 4, D), 0.01)
    x[0, 0, 3] = 500.0  # > 100 and >= 1000 x median (0.01): massive
    x[0, 2, 5] = 50.0  # >= 1000 x median but < 100: ratio-only
    probe._massive(x)
    assert probe.massive["count"] == 1 and probe.massive["ratio_only_count"] == 2
    assert dict(probe.massive["positions"]) == {0: 1}


def test_massive_activation_median_shortcut_matches_the_full_median():
    """_massive skips the median where no element can reach 1000x it; the counts must equal
    the definition computed with the median of every sample, boundary cases included."""
    def reference(x):
        magnitude = x.abs()
        median = magnitude.flatten(1).median(dim=1).values[:, None, None]
        ratio = magnitude >= 1000 * median.clamp_min(1e-12)
        return int((ratio & (magnitude > 100)).sum()), int(ratio.sum())

    generator = torch.Generator().manual_seed(0)
    cases = [torch.randn(3, 16, D, generator=generator)]  # no outliers at all
    spiky = torch.randn(3, 16, D, generator=generator) * 0.01
    spiky[1, 0, 2], spiky[2, 5, 9] = 800.0, 40.0  # one massive sample, one ratio-only, one plain
    cases.append(spiky)
    edge = torch.full((2, 4, 4), 1.0)
    edge[:, 0, 0] = 1000.0  # peak exactly 1000 x the median: counts as a hit (>=)
    edge[1, 0, 0] = 999.0  # just below
    cases.append(edge)
    half = torch.full((1, 2, 4), 0.2)
    half[0, 0, :] = 500.0  # torch takes the lower middle (0.2): 500 >= 200 is a hit; a mid-point median would miss it
    cases.append(half)
    cases.append(torch.zeros(2, 4, 4))
    for x in cases:
        probe = ActivationProbe(model())
        probe._massive(x)
        assert (probe.massive["count"], probe.massive["ratio_only_count"]) == reference(x)
        assert probe.massive["max"] == x.abs().max().item()


def test_massive_activation_median_is_over_the_sequence_not_the_token():
    """A sink token whose whole vector is inflated (median 30) still carries a massive
    activation (5000 >= 1000 x the sequence median 0.01), as in SmolLM2's token 0."""
    probe = ActivationProbe(model())
    x = torch.full((1, 8, D), 0.01)
    x[0, 0, :] = 30.0
    x[0, 0, 7] = 5000.0
    probe._massive(x)
    assert probe.massive["count"] == 1  # 30 < 100: only the 5000 is massive
    assert probe.massive["ratio_only_count"] == D  # every entry of token 0 is >= 1000 x 0.01
    assert probe.massive["max"] == 5000.0 and probe.massive["max_position"] == 0


def test_sink_rate_of_a_known_attention_pattern():
    probe = AttentionProbe()
    probs = torch.zeros(3, 2, T, T)
    probs[:, 0, :, 0] = 1.0  # head 0: every query puts all its mass on token 0
    causal = torch.ones(T, T).tril()
    probs[:, 1] = causal / causal.sum(-1, keepdim=True)  # head 1: uniform over visible keys
    probe.observe(0, probs)
    result = probe.summary()
    assert result["sink_rate@0.3"] == pytest.approx(50.0)
    uniform_share = sum(1 / (i + 1) for i in range(1, T)) / (T - 1)
    assert result["first_token_share_per_head"][0] == pytest.approx([1.0, uniform_share], rel=1e-5)


def test_probes_see_quantized_attention_and_restore_the_model():
    from qbench.quant import quantize

    m = model("vga")
    fp = run_probes(m, windows())
    assert m.model.layers[0].attn.qbench_hooks is None and m.model.layers[0].attn.qbench_kernel is None
    assert len(fp["gate_mean_per_head"]) == LAYERS and 0 < fp["gate_mean_per_head"][0][0] < 1
    quantize(m, "w8a8-attn")
    q = run_probes(m, windows())
    assert q["first_token_share_per_layer"] != fp["first_token_share_per_layer"]
    assert q["first_token_share_per_layer"] == pytest.approx(fp["first_token_share_per_layer"], abs=0.02)


def test_probe_memory_is_flat_in_the_number_of_samples():
    """The probe keeps running sums: its state has the same size after 2 and 8 batches."""
    m = model()
    sizes = []
    for n in (2, 8):
        probe = ActivationProbe(m)
        with probe, torch.no_grad():
            for w in windows(n):
                m(w[None])
        sizes.append(sum(t.numel() for t in probe.feature_hits.values()) + len(probe.max_sum))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("kernel", ["cpu-flash", "marker"])
def test_first_column_sdpa_equals_explicit_softmax(kernel, monkeypatch):
    """The probes keep the fused attention and read P[..., 0] from it: both ways (the CPU
    flash kernel's log-sum-exp, the extra value channel) must equal softmax(QK^T/sqrt(d))."""
    from qbench.modeling import attention

    if kernel == "marker":
        monkeypatch.setattr(attention, "_CPU_FLASH", "no_such_kernel")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=generator) * 2 for _ in range(3))
    out, first = attention.first_column_sdpa(q, k, v)
    probs = torch.softmax(attention.causal_scores(q, k), dim=-1)
    torch.testing.assert_close(out, probs @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, probs[..., 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arm", ["softmax", "vga"])
def test_probe_sink_share_is_the_same_on_the_fused_and_the_explicit_path(arm):
    """With no quantizer the attention probe rides on the fused kernel; with (identity)
    quantizer sites it sees the materialised probabilities: same first-token shares."""
    from qbench.modeling.model import QBenchAttention

    class Identity(torch.nn.Module):
        def scores(self, x):
            return x

        def probs(self, x):
            return x

        def context(self, x):
            return x

    m = model(arm)
    windows = list(torch.randint(3, 320, (6, T), generator=torch.Generator().manual_seed(1)))
    fused = run_probes(m, windows, batch_size=3)
    for module in m.modules():
        if isinstance(module, QBenchAttention):
            module.qbench_hooks = Identity()
    explicit = run_probes(m, windows, batch_size=3)
    for a, b in zip(fused["first_token_share_per_head"], explicit["first_token_share_per_head"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert fused["sink_rate@0.3"] == explicit["sink_rate@0.3"]
    assert fused["max_inf_norm"] == pytest.approx(explicit["max_inf_norm"], rel=1e-5)


def test_batched_layer_statistics_equal_the_per_site_definitions():
    """One layer's sites reduced as a stacked batch give each site's own max|x|, kurtosis,
    |x| >= 6 count and per-dimension hits, sites with and without outliers mixed."""
    generator = torch.Generator().manual_seed(3)
    probe = ActivationProbe(model())
    items = []
    for n, site in enumerate(("attn_input", "attn_output", "ffn_input", "ffn_output", "block_output")):
        x = torch.randn(2, 5, D, generator=generator) * (1 + n)  # sites 3+ pass 6 somewhere
        if site == "attn_input":
            x[1, 2, 7] = 9.0  # an outlier in a site whose other values stay small
        items.append((site, x))
    probe.samples = 2
    probe._layer_statistics(0, items)
    count = 0
    for site, x in items:
        flat = x.reshape(2, -1)
        assert float(probe.max_sum[(0, site)]) == pytest.approx(flat.abs().amax(dim=1).sum().item(), rel=1e-6)
        centered = flat - flat.mean(dim=1, keepdim=True)
        kurt = (centered ** 4).mean(dim=1) / (centered.pow(2).mean(dim=1) ** 2 + 1e-6)
        assert float(probe.kurt_sum[(0, site)]) == pytest.approx(kurt.sum().item(), rel=1e-4)
        big = x.abs() >= 6
        count += int(big.sum())
        if site in ("attn_input", "ffn_input") and big.any():
            assert torch.equal(probe.feature_hits[(0, site)], big.sum(dim=(0, 1)))
    assert probe.count6 == count > 0


def test_mechanism_metrics_on_a_llama_model_and_its_retrofit_at_identity():
    """Through the families module bb_mechanism reads stock models too (grouped-query
    values): a retrofitted vga gate at its identity init (2 sigmoid(0) = 1) measures what
    the plain model measures, and the attention implementation is restored."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.modeling.llama_arms import install_arm
    from qbench.probes.mechanism import bb_mechanism

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()

    tokens = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    plain = llama()
    implementation = plain.config._attn_implementation
    base = bb_mechanism(plain, tokens, lambda x: x % 7 == 0)
    assert plain.config._attn_implementation == implementation
    retrofit = llama()
    install_arm(retrofit, "vga")
    gated = bb_mechanism(retrofit, tokens, lambda x: x % 7 == 0)
    assert gated["gate_bos"] == gated["gate_others"] == 1.0
    for key in ("attn_s", "delta_logit_s", "val_s", "val_s_ratio"):
        assert gated[key] == pytest.approx(base[key], rel=1e-5), key
    assert gated["val_s_eff"] == pytest.approx(gated["val_s"], rel=1e-6)
