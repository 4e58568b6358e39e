"""The static protocol's pieces, the HF attention registry, and bnb/quanto equal to using
those libraries directly."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.modeling import QBenchConfig, QBenchForCausalLM
from qbench.quant import quantize
from qbench.quant.grid import affine_params, quantize_weight
from qbench.quant.static import ActivationQuantizer

N_LAYER = 2


def tiny_qbench(arm="vga"):
    torch.manual_seed(0)
    config = QBenchConfig(vocab_size=320, n_layer=N_LAYER, n_head=2, d_model=64, d_ff=128, attention=arm,
                          max_position_embeddings=32)
    return QBenchForCausalLM(config).eval()


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYER,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def calibration(n, seed, batch_size):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (batch_size, 24), generator=generator) for _ in range(n)]


def test_running_min_max_uses_momentum_and_passes_infinities():
    q = ActivationQuantizer(bits=8, momentum=0.9)
    q(torch.tensor([-1.0, 2.0]))
    q(torch.tensor([-3.0, 4.0, float("-inf")]))
    assert q.lo.item() == pytest.approx(0.9 * -1 + 0.1 * -3) and q.hi.item() == pytest.approx(0.9 * 2 + 0.1 * 4)
    q.calibrating = False
    x = torch.linspace(-1.2, 2.2, 101)
    scale, _ = affine_params(q.lo, q.hi, 8)
    assert ((q(x) - x).abs() <= scale / 2 + 1e-6).all()  # inside the range: half a step
    assert q(torch.tensor([float("-inf")])).item() == float("-inf")  # masked scores stay masked
    assert q(torch.tensor([100.0])).item() == pytest.approx(q.hi.item(), abs=scale.item())  # clipped


@pytest.mark.parametrize("granularity,group", [("per_tensor", None), ("per_channel", None), ("group", 16)])
def test_weight_grids_bound_the_error(granularity, group):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = quantize_weight(w, 4, granularity, group, symmetric=True)
    rows = {"per_tensor": w.reshape(1, -1), "per_channel": w, "group": w.reshape(-1, 16)}[granularity]
    step = rows.abs().amax(dim=1, keepdim=True) / 7
    assert ((q.reshape(rows.shape) - rows).abs() <= step / 2 + 1e-6).all()
    mse = quantize_weight(w, 4, granularity, group, symmetric=True, range_method="mse")
    assert (mse - w).pow(2).sum() <= (q - w).pow(2).sum() + 1e-6  # the search includes min-max


def test_w8a8_pt_quantizes_every_site_of_the_protocol():
    model = tiny_qbench("vga")
    x = torch.randint(3, 320, (2, 24))
    reference = model(x).logits
    facts = quantize(model, "w8a8-pt", calibration)
    assert facts["sites"] == {"linear inputs/outputs": 6 * N_LAYER, "embeddings": 2, "norm outputs": 2 * N_LAYER + 1,
                              "residual sums": 2 * N_LAYER + 1, "attention scores/probs/context": N_LAYER}
    assert facts["calibration_batches"] == 16
    assert type(model.model.layers[0].attn.gate_proj).__name__ == "GateLinear"  # gates stay fp by default
    out = model(x).logits
    assert torch.isfinite(out).all() and 0 < (out - reference).abs().max() < 1.0
    gated = tiny_qbench("vga")
    assert quantize(gated, "w8a8-pt-gates", calibration)["sites"]["linear inputs/outputs"] == 7 * N_LAYER


def test_hf_registry_attention_equals_eager_and_carries_quantizers():
    from qbench.modeling.hooks import install_attention

    model = tiny_llama()
    x = torch.randint(3, 320, (2, 20))
    model.set_attn_implementation("eager")
    eager = model(x).logits
    install_attention(model)
    torch.testing.assert_close(model(x).logits, eager, atol=1e-5, rtol=1e-5)
    facts = quantize(tiny_llama(), "w8a8-pt", calibration)
    assert facts["sites"]["attention scores/probs/context"] == N_LAYER
    assert facts["sites"]["residual sums"] == 0  # stock forward is not patched: stated in the record


def test_bitsandbytes_equals_transformers_bitsandbytes_loading(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = tiny_qbench("softmax")
    model.save_pretrained(tmp_path)
    x = torch.randint(3, 320, (2, 24))
    for scheme, config in [
        ("llm-int8", BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=["lm_head"])),
        ("nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                   llm_int8_skip_modules=["lm_head"])),
    ]:
        ours = tiny_qbench("softmax")
        quantize(ours, scheme)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5, msg=scheme)


def test_quanto_equals_quanto_used_directly():
    import optimum.quanto as quanto

    x = torch.randint(3, 320, (2, 24))
    ours = tiny_qbench("softmax")
    facts = quantize(ours, "quanto-w8a8", calibration)
    assert facts["quantized_linears"] == 6 * N_LAYER
    theirs = tiny_qbench("softmax")
    quanto.quantize(theirs, weights=quanto.qint8, activations=quanto.qint8, exclude=["lm_head"])
    with torch.no_grad(), quanto.Calibration():
        for batch in calibration(16, 0, 4):
            theirs(batch)
    quanto.freeze(theirs)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits)


def test_llm_int8_threshold_rescues_outlier_features():
    """With a |x| = 40 input column, threshold 6 keeps it in fp16 while threshold 0 quantizes
    it with the rest of its row; the vector-wise int8 error then grows with max|x_row|."""
    from qbench.quant.bnb import int8_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256)
    x = torch.randn(8, 256)
    x[:, 5] = 40.0
    with torch.no_grad():
        rescued = (int8_linear(linear, 6.0)(x) - linear(x)).abs().max()
        plain = (int8_linear(linear, 0.0)(x) - linear(x)).abs().max()
    assert rescued * 4 < plain
