"""KV-cache quantization: the quantizer against a loop-by-loop reference, the exact sink and
residual tokens, every arm under a KV scheme, stock HF models with GQA, and agreement with
transformers' QuantizedCache (quanto backend) in real greedy decoding.

Tolerances come from the grid: asymmetric min-max with 2^b - 1 steps of s = (hi - lo) /
(2^b - 1) per group moves each element by at most s / 2 (plus float rounding)."""
import math

import pytest
import torch

from qbench.modeling import ATTENTION_ARMS, QBenchConfig
from qbench.modeling.compose import compose
from qbench.modeling.model import QBenchAttention, QBenchForCausalLM
from qbench.quant import quantize
from qbench.quant.kvcache import KVCacheQuantizer, KVCacheSpec
from qbench.quant.scheme import SCHEMES, Scheme

T, D = 40, 16


def reference_group(values: list[float], bits: int) -> list[float]:
    """One group, element by element: lo + s round((x - lo) / s), s = (hi - lo) / (2^b - 1)."""
    lo, hi = min(values), max(values)
    step = (hi - lo) / (2 ** bits - 1)
    if step == 0:
        return list(values)
    return [lo + step * min(max(round((x - lo) / step), 0), 2 ** bits - 1) for x in values]


def reference_head(x: torch.Tensor, spec: KVCacheSpec, axis: str) -> torch.Tensor:
    """(T, D) of one head, token by token or channel by channel, group by group."""
    out = x.clone().double()
    rows = x.double().tolist()
    t, d = x.shape
    if axis == "token":
        g = spec.group_size or d
        for i in range(spec.sink, t):
            for start in range(0, d, g):
                out[i, start:start + g] = torch.tensor(reference_group(rows[i][start:start + g], spec.bits))
    else:
        g = spec.group_size
        for c in range(d):
            for start in range(spec.sink, t, g):
                column = [rows[i][c] for i in range(start, min(start + g, t))]
                out[start:start + len(column), c] = torch.tensor(reference_group(column, spec.bits))
    return out.float()


SPECS = [KVCacheSpec(4), KVCacheSpec(2, group_size=8), KVCacheSpec(8, sink=1),
         KVCacheSpec(2, "channel", group_size=8, residual=8, sink=1), KVCacheSpec(4, "channel", group_size=16,
                                                                                 residual=16)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.formula()[:60])
def test_keys_and_values_equal_the_loop_reference_on_one_head(spec):
    torch.manual_seed(0)
    k = torch.randn(1, 1, T, D) * torch.linspace(0.2, 5, D)  # outlier channels, as keys have
    v = torch.randn(1, 1, T, D)
    k_q, v_q = KVCacheQuantizer(spec).quantize(k, v)
    for x, x_q, axis in ((k, k_q, spec.key_axis), (v, v_q, spec.value_axis)):
        ref = reference_head(x[0, 0], spec, axis)
        # same arithmetic in another order: a code may differ only where x sits on a rounding
        # boundary, which random data does not hit; float rounding of lo + s q stays ~1e-6
        torch.testing.assert_close(x_q[0, 0], ref, rtol=0, atol=1e-5)
        # and the grid's own bound: half a step of the group's range, here of the whole head
        step = (x[..., spec.sink:, :].amax() - x[..., spec.sink:, :].amin()) / (2 ** spec.bits - 1)
        assert (x_q - x).abs().max() <= step / 2 + 1e-5
        assert not torch.equal(x_q[..., spec.sink:, :], x[..., spec.sink:, :])  # it did quantize


@pytest.mark.parametrize("sink", [1, 3])
def test_sink_tokens_are_bit_exact(sink):
    torch.manual_seed(1)
    k, v = torch.randn(2, 3, T, D) * 10, torch.randn(2, 3, T, D)
    for spec in (KVCacheSpec(2, sink=sink), KVCacheSpec(2, "channel", group_size=8, residual=8, sink=sink)):
        k_q, v_q = KVCacheQuantizer(spec).quantize(k, v)
        assert torch.equal(k_q[..., :sink, :], k[..., :sink, :]) and torch.equal(v_q[..., :sink, :], v[..., :sink, :])
        assert (k_q[..., sink:, :] != k[..., sink:, :]).any()
        # the sink's key does not stretch the others' grid: the rest quantize as if it were not there
        rest = KVCacheSpec(spec.bits, spec.key_axis, spec.value_axis, spec.group_size, spec.residual, 0)
        alone = KVCacheQuantizer(rest).quantize(k[..., sink:, :], v[..., sink:, :])
        assert torch.equal(alone[0], k_q[..., sink:, :]) and torch.equal(alone[1], v_q[..., sink:, :])


def per_query_reference(q, k, v, k_q, v_q, window):
    """Query by query: the keys and values it reads are exact within `window` of it."""
    out = torch.zeros_like(q)
    for i in range(q.shape[-2]):
        keys = torch.stack([k[..., j, :] if i - j < window else k_q[..., j, :] for j in range(i + 1)], dim=-2)
        values = torch.stack([v[..., j, :] if i - j < window else v_q[..., j, :] for j in range(i + 1)], dim=-2)
        p = torch.softmax(q[..., i:i + 1, :] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out[..., i:i + 1, :] = p @ values
    return out


class Cached:
    """A KV cache quantizer that hands over given keys and values, the last `window` exact."""

    def __init__(self, k_q, v_q, window):
        self.k_q, self.v_q, self.exact_recent = k_q, v_q, window

    def quantize(self, k, v):
        return self.k_q, self.v_q


@pytest.mark.parametrize("window", [1, 8, 32])
def test_residual_window_is_read_exact(window):
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    k_q, v_q = KVCacheQuantizer(KVCacheSpec(2)).quantize(k, v)
    arm = ATTENTION_ARMS["softmax"]
    got = compose(arm, q, k, v, kv=Cached(k_q, v_q, window))
    torch.testing.assert_close(got, per_query_reference(q, k, v, k_q, v_q, window), rtol=0, atol=1e-5)
    # a window over every token is the float attention itself
    whole = compose(arm, q, k, v, kv=Cached(k_q, v_q, T))
    torch.testing.assert_close(whole, compose(arm, q, k, v), rtol=0, atol=1e-5)


def tiny_model(arm: str) -> QBenchForCausalLM:
    torch.manual_seed(0)
    config = QBenchConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, max_position_embeddings=T,
                          attention=arm)
    model = QBenchForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the init, so 2-bit keys change the logits visibly
        for p in model.parameters():
            p.mul_(10.0 if p.dim() == 2 else 1.0)
    return model


def kv_scheme(spec: KVCacheSpec) -> Scheme:
    return Scheme("kv-test", "reference", "test", options={"kv_cache": spec.to_options()})


@pytest.mark.parametrize("arm", sorted(ATTENTION_ARMS))
def test_every_arm_runs_under_a_kv_scheme(arm):
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(3))
    model = tiny_model(arm)
    with torch.no_grad():
        fp = model(ids).logits
        facts = quantize(model, kv_scheme(KVCacheSpec(2, sink=1)))
        assert facts["kv_cache_layers"] == 2
        quantized = model(ids).logits
        assert torch.isfinite(quantized).all() and not torch.allclose(quantized, fp, atol=1e-4)
        # the window path: a window over the whole sequence reads every key and value exact
        model = tiny_model(arm)
        quantize(model, kv_scheme(KVCacheSpec(2, "channel", group_size=8, residual=T)))
        torch.testing.assert_close(model(ids).logits, fp, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arm", sorted(ATTENTION_ARMS))
def test_quantized_keys_and_values_feed_the_arm_as_they_are(arm):
    """The layer under a KV hook equals the arm's float attention computed by hand on the
    cached K and V, with a value-reading gate fed the cached V."""
    layer = tiny_model(arm).model.layers[0].attn
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(4))
    spec = KVCacheSpec(4, sink=1)
    layer.qbench_kv = KVCacheQuantizer(spec)
    with torch.no_grad():
        got = layer(x)
        q, k, v = (layer._split(p(x)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        k_q, v_q = KVCacheQuantizer(spec).quantize(k, v)
        gate = layer.gate(x, v_q.transpose(1, 2).reshape(2, T, 32))
        by_hand = compose(layer.arm, q, k_q, v_q, gate=gate, module=layer)
        want = layer.o_proj(by_hand.transpose(1, 2).reshape(2, T, 32))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def tiny_llama(vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_stock_llama_with_gqa_quantizes_per_kv_head():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fp = model(ids).logits
        seen = []
        facts = quantize(model, kv_scheme(KVCacheSpec(4, sink=1)))
        hook = model.model.layers[0].self_attn.qbench_kv
        original = hook.quantize
        hook.quantize = lambda k, v: (seen.append(k.shape), original(k, v))[1]
        quantized = model(ids).logits
    assert facts["kv_cache_layers"] == 2 and facts["kv_cache_bytes_per_token"] > 0
    assert seen[0] == (1, 2, T, 16)  # the two KV heads as cached, before the GQA repeat to four
    assert torch.isfinite(quantized).all() and not torch.allclose(quantized, fp, atol=1e-4)


@pytest.mark.parametrize("arm", ["vga", "vga_out", "qwen_g1", "vga_x"])
def test_retrofitted_arm_composes_with_an_exact_window(arm):
    """A retrofitted arm reads a windowed KV cache through the same composition: at its
    identity init (g = 2 sigmoid(0) = 1 exactly) it gives the stock model's logits under the
    same cache bit for bit; with a gate that bites, a window over every token is the arm's
    float attention (P V_q + P (V - V_q) against P V: float32 rounding, 1e-5 of logits of
    order 1), and a short window differs from it."""
    from qbench.modeling.llama_arms import install_arm

    ids = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(6))
    spec = KVCacheSpec(2, "channel", group_size=4, residual=5)
    stock, retrofitted = tiny_llama(), tiny_llama()
    install_arm(retrofitted, arm)
    with torch.no_grad():
        quantize(stock, kv_scheme(spec))
        quantize(retrofitted, kv_scheme(spec))
        assert torch.equal(retrofitted(ids).logits, stock(ids).logits)
        for name, p in retrofitted.named_parameters():
            if ".qbench_gate." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        short = retrofitted(ids).logits
        for module in retrofitted.model.layers:
            module.self_attn.qbench_kv = None
        fp = retrofitted(ids).logits
        quantize(retrofitted, kv_scheme(KVCacheSpec(2, "channel", group_size=4, residual=T)))
        torch.testing.assert_close(retrofitted(ids).logits, fp, rtol=0, atol=1e-5)
    assert not torch.allclose(short, fp, atol=1e-3)


def greedy_steps(model, first, prompt_len, new_tokens, cache):
    """Feed the sequence one token at a time (every step a decode step, prefill of one
    token), greedy after the prompt; returns the tokens and each step's logits."""
    tokens, logits = [first], []
    with torch.no_grad():
        for step in range(prompt_len + new_tokens - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
            if step + 1 >= prompt_len:
                tokens.append(int(out.logits[0, -1].argmax()))
            else:
                tokens.append(PROMPT[step + 1])
    return tokens, torch.stack(logits)


PROMPT = [5, 17, 42, 3, 77, 9, 61, 20, 33, 8, 50, 14]


def test_agrees_with_transformers_quantized_cache():
    """QuantizedCache(quanto, nbits 4, axis 0 = per token in groups of 8 channels, residual
    length 1) re-quantizes the whole cache at every step and returns the new token exact: that
    is kv4 per token, groups of 8, with an exact window of 1 (the token reading itself).  Their
    re-quantization of already-dequantized values is idempotent up to float rounding, so the
    two agree to float precision: same tokens, logits within 1e-3."""
    pytest.importorskip("optimum.quanto")
    from transformers import DynamicCache, QuantizedCache

    model = tiny_llama()
    theirs = greedy_steps(model, PROMPT[0], len(PROMPT), 12, QuantizedCache(
        "quanto", model.config, nbits=4, axis_key=0, axis_value=0, q_group_size=8, residual_length=1))
    fp = greedy_steps(model, PROMPT[0], len(PROMPT), 12, DynamicCache(config=model.config))
    quantize(model, kv_scheme(KVCacheSpec(4, group_size=8, residual=1)))
    ours = greedy_steps(model, PROMPT[0], len(PROMPT), 12, DynamicCache(config=model.config))
    assert ours[0] == theirs[0]
    gap = (ours[1] - theirs[1]).abs().max()
    quantization = (fp[1] - theirs[1]).abs().max()
    assert gap < 1e-3 and quantization > 100 * gap  # the agreement is not that of two fp runs


def test_bad_kv_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8, got 5"):
        KVCacheSpec(5)
    with pytest.raises(ValueError, match="group_size <= residual"):
        KVCacheSpec(2, "channel", group_size=32, residual=0)
    with pytest.raises(ValueError, match="does not divide the head width 16"):
        KVCacheQuantizer(KVCacheSpec(4, group_size=12)).quantize(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
    layer = tiny_model("softmax").model.layers[0].attn
    layer.qbench_kv = KVCacheQuantizer(KVCacheSpec(4, residual=4))
    from qbench.quant.lowbit_attention import LowBitAttention

    layer.qbench_kernel = LowBitAttention()
    with pytest.raises(NotImplementedError, match="window of 0"):
        layer(torch.randn(1, 8, 32))


def test_cache_bytes_per_token_count_scales_and_the_exact_window():
    # kv4 over a 64-wide head: 2 x 64 x 4 bits = 64 bytes, plus fp16 scale and minimum for K and V
    assert KVCacheSpec(4).bytes_per_token(64) == 64 + 2 * 4
    # KIVI-2, groups of 32: 32 bytes of codes; keys 64 channels x 4 bytes / 32 tokens; values 2 groups x 4 bytes
    kivi = KVCacheSpec(2, "channel", group_size=32, residual=128)
    assert kivi.bytes_per_token(64) == 32 + 8 + 8
    # at 256 tokens half are in the fp16 window (256 bytes each)
    assert kivi.bytes_per_token(64, 256) == (128 * 256 + 128 * 48) / 256
    assert all(s.kv_cache() is None or s.kv_cache().bits in (2, 4, 8) for s in SCHEMES.values())


def test_kv_section_reports_n_and_range_and_names_a_lead_only_when_ranges_part():
    from qbench.study.kv import kv_section

    def record(model, scheme, ppl):
        return {"model": model, "scheme": scheme, "task": "ppl", "status": "ok", "protocol": "p",
                "metrics": {"ppl": ppl, "tokens": 10}, "quantization": {},
                "provenance": {"finished_at": "2026-01-01T00:00:00Z"}}

    zoo = {"tiny-a": {"arm": "softmax"}, "tiny-a-s1": {"arm": "softmax"}, "tiny-b": {"arm": "vga"},
           "tiny-b-s1": {"arm": "vga"}}
    records = [record(m, "fp32", 100.0) for m in zoo]
    records += [record("tiny-a", "kv4", 110.0), record("tiny-a-s1", "kv4", 120.0),  # +10, +20
                record("tiny-b", "kv4", 101.0), record("tiny-b-s1", "kv4", 103.0),  # +1, +3: parts from a
                record("tiny-a", "kv2", 150.0), record("tiny-a-s1", "kv2", 105.0),  # +50, +5
                record("tiny-b", "kv2", 110.0), record("tiny-b-s1", "kv2", 110.0)]  # +10: overlaps a
    task = {"model": "smollm2-135m", "task": "qbench_agreement", "status": "ok", "protocol": "lm-eval-x"}
    records += [{**task, "scheme": "fp32", "metrics": {"accuracy": 0.9, "items": 200}},
                {**task, "scheme": "kv4", "metrics": {"accuracy": 0.8, "flip_rate": 0.15, "recovery": 0.8 / 0.9}}]
    text = kv_section(records, zoo)
    assert "| kv4 | 0.800 | 0.150 | 0.889 |" in text and "(n = 200 items" in text
    assert "| arm | kv4 | kv2 |" in text  # columns in KV_SCHEMES order
    assert "| softmax | +15.00 [+10.00, +20.00] (2) | +27.50 [+5.00, +50.00] (2) |" in text
    assert "- kv4: vga leads" in text and "softmax trails" not in text.split("- kv2")[1]
    assert "- kv2: no arm leads or trails" in text


def test_kv_arm_tables_never_pool_two_protocols():
    """Seeds measured on two texts are two tables: a column "mean over training seeds" holds
    one protocol's seeds only."""
    from qbench.study.kv import kv_section

    def record(model, scheme, ppl, protocol):
        return {"model": model, "scheme": scheme, "task": "ppl", "status": "ok", "protocol": protocol,
                "metrics": {"ppl": ppl, "tokens": 10}, "quantization": {},
                "provenance": {"finished_at": "2026-01-01T00:00:00Z"}}

    zoo = {"tiny-a": {"arm": "softmax"}, "tiny-a-s1": {"arm": "softmax"}}
    records = [record(m, "fp32", 100.0, p) for m in zoo for p in ("short", "long")]
    records += [record("tiny-a", "kv4", 110.0, "short"), record("tiny-a-s1", "kv4", 120.0, "short"),
                record("tiny-a", "kv4", 101.0, "long"), record("tiny-a-s1", "kv4", 103.0, "long")]
    text = kv_section(records, zoo)
    assert "(protocol `short`)" in text and "(protocol `long`)" in text
    assert "| softmax | +15.00 [+10.00, +20.00] (2) |" in text and "| softmax | +2.00 [+1.00, +3.00] (2) |" in text
    assert "(4)" not in text


def test_a_kv_exact_window_that_covers_the_evaluation_window_is_refused_or_warned(capsys, monkeypatch):
    """KIVI's last 128 tokens exact: on a 128-token window no query reads a quantized entry
    (refused at planning); on 256 tokens a quarter of the reads are quantized (warned once)."""
    from qbench.eval.perplexity import PerplexityProtocol
    import qbench.plan
    from qbench.plan import check_kv_window
    from qbench.quant import get_scheme

    monkeypatch.setattr(qbench.plan, "_KV_WARNED", set())  # warned once per process: start afresh
    kivi, spec = get_scheme("kv2-kivi-g32-r128"), KVCacheSpec(2, "channel", group_size=32, residual=128)
    # reads of queries 0..254: keys j <= i - 128 are quantized: sum_k k for k <= 127 over sum (i + 1)
    assert spec.quantized_read_fraction(range(0, 255)) == pytest.approx((127 * 128 / 2) / (255 * 256 / 2))
    with pytest.raises(ValueError, match="no query of protocol nonoverlap-w128.* reads a quantized key"):
        check_kv_window(kivi, PerplexityProtocol(window=128), "ppl", "m")
    check_kv_window(kivi, PerplexityProtocol(window=256), "ppl", "m")
    check_kv_window(kivi, PerplexityProtocol(window=256), "ppl", "m")
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 1 and "only 25% of the scored queries' attention reads are quantized" in warned[0]
    check_kv_window(kivi, PerplexityProtocol(window=2048), "ppl", "m")  # 88%: no warning
    check_kv_window(get_scheme("kv4"), PerplexityProtocol(window=16), "ppl", "m")  # nothing exact
    assert capsys.readouterr().err == ""
    # llama.cpp scores the second half: on 256 tokens its queries 128..254 do read quantized keys
    check_kv_window(kivi, PerplexityProtocol(kind="llamacpp", window=256), "ppl", "m")
    assert "under llamacpp-c256" in capsys.readouterr().err
