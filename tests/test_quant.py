import json
import subprocess
import sys

import pytest
import torch

from qbench.modeling import QBenchConfig, QBenchForCausalLM
from qbench.modeling.model import GateLinear
from qbench.quant import SCHEMES, Scheme, get_scheme, quantize
from qbench.quant.simulated import DynamicQuantLinear, fake_quantize_symmetric, symmetric_scale

FP32_UNIT_ROUNDOFF = 2.0 ** -24


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_fake_quantization_error_is_at_most_half_a_step(bits):
    torch.manual_seed(0)
    x = torch.randn(64, 128) * torch.rand(64, 1) * 10
    scale = symmetric_scale(x, bits, dim=1)  # per row; the row max sits on the grid's edge
    error = (fake_quantize_symmetric(x, bits, dim=1) - x).abs()
    assert (error <= scale / 2 * (1 + 1e-5)).all()
    assert (error.amax(dim=1) > scale.squeeze(1) / 4).any()  # and it is not trivially zero


def test_real_int8_path_matches_simulated_within_accumulated_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 320)
    x = torch.randn(5, 33, 192) * 4
    simulated = DynamicQuantLinear(linear, 8, 8, int8_matmul=False)
    real = DynamicQuantLinear(linear, 8, 8, int8_matmul=True)
    y_sim, y_real = simulated(x), real(x)
    # The int32 accumulation is exact; the float one errs by at most
    # gamma_K * sum_k |x_k w_k| with gamma_K = K u / (1 - K u) (Higham), plus the rescaling.
    x2 = x.reshape(-1, 192)
    x_q = fake_quantize_symmetric(x2, 8, dim=1)
    magnitude = (x_q.abs() @ simulated.weight.abs().t()).reshape(y_sim.shape)
    k = 192
    bound = (k * FP32_UNIT_ROUNDOFF / (1 - k * FP32_UNIT_ROUNDOFF)) * magnitude + 4 * FP32_UNIT_ROUNDOFF * (
        magnitude + linear.bias.abs())
    assert ((y_sim - y_real).abs() <= bound).all()
    assert (y_sim - linear(x)).abs().max() > 1e-3  # quantization did something


def test_w8a8_dynamic_swaps_every_linear_but_lm_head_and_gates():
    torch.manual_seed(0)
    config = QBenchConfig(vocab_size=320, n_layer=2, n_head=2, d_model=64, d_ff=128, attention="vga",
                          max_position_embeddings=32)
    model = QBenchForCausalLM(config)
    x = torch.randint(0, 320, (2, 16))
    reference = model(x).logits
    facts = quantize(model, "w8a8-dyn")
    assert facts["quantized_linears"] == 2 * 6  # q, k, v, o, fc1, fc2 per layer
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert all(isinstance(m, GateLinear) for n, m in model.named_modules() if n.endswith("gate_proj"))
    assert sum(isinstance(m, DynamicQuantLinear) for m in model.modules()) == 12
    out = model(x).logits
    assert torch.isfinite(out).all() and 0 < (out - reference).abs().max() < 0.5


def test_scheme_json_round_trip_and_stable_hash():
    for scheme in SCHEMES.values():
        again = Scheme.from_json(scheme.to_json())
        assert again == scheme and again.hash() == scheme.hash()
    code = "import qbench.quant as q; print(q.get_scheme('w8a8-dyn').hash())"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == get_scheme("w8a8-dyn").hash()
    assert len({s.hash() for s in SCHEMES.values()}) == len(SCHEMES)
    assert json.loads(get_scheme("w8a8-dyn").to_json())["weight_bits"] == 8


def test_unknown_scheme_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'w8a8-dyn'"):
        get_scheme("w8a8-dym")


@pytest.mark.parametrize("group", [16, 32])
def test_asymmetric_group_rtn_error_is_at_most_half_a_step(group):
    from qbench.quant.grid import quantize_weight

    torch.manual_seed(0)
    w = torch.randn(16, 64) + 0.3
    q = quantize_weight(w, 4, "group", group, symmetric=False)
    rows, q_rows = w.reshape(-1, group), q.reshape(-1, group)
    lo, hi = rows.amin(1, keepdim=True).clamp(max=0), rows.amax(1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 15
    assert ((q_rows - rows).abs() <= step / 2 + 1e-6).all()
    assert q_rows.unique().numel() > 16  # several groups, each with its own grid


def test_missing_optional_backend_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    config = QBenchConfig(vocab_size=320, n_layer=1, n_head=2, d_model=64, d_ff=128, max_position_embeddings=32)
    with pytest.raises(ImportError, match="`bitsandbytes` package"):
        quantize(QBenchForCausalLM(config), "nf4")
    with pytest.raises(ImportError, match="`optimum-quanto` package"):
        quantize(QBenchForCausalLM(config), "quanto-w4")
    code = "import sys; sys.modules['bitsandbytes'] = None; sys.modules['optimum'] = None; import qbench.quant, qbench.runner"
    subprocess.run([sys.executable, "-c", code], check=True)  # qbench imports without them
