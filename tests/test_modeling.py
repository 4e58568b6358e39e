import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import qbench.modeling  # noqa: F401  registers the model type
from qbench.modeling import QBenchConfig, QBenchForCausalLM


def small_config(**kw):
    return QBenchConfig(vocab_size=320, n_layer=2, n_head=2, d_model=64, d_ff=128, max_position_embeddings=32, **kw)


@pytest.mark.parametrize("arm,expected", [("vga", 0.5), ("iga", 0.25), ("qwen_g1", 0.5)])
def test_gates_open_to_gate_init(arm, expected):
    torch.manual_seed(0)
    model = QBenchForCausalLM(small_config(attention=arm))
    bias = model.model.layers[0].attn.gate_proj.bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, expected))


def test_gate_init_is_configurable_and_validated():
    assert QBenchConfig(attention="vga", gate_init=0.9).gate_init == 0.9
    with pytest.raises(ValueError, match="gate_init"):
        QBenchConfig(attention="vga", gate_init=1.5)
    with pytest.raises(ValueError, match="unknown attention arm"):
        QBenchConfig(attention="vgaa")


def test_save_and_load_through_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = QBenchForCausalLM(small_config(attention="vga_out")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "qbench"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, QBenchForCausalLM)
    x = torch.randint(0, 320, (2, 16))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_right_padding_leaves_real_tokens_unchanged_and_left_padding_is_refused():
    torch.manual_seed(0)
    model = QBenchForCausalLM(small_config()).eval()
    x = torch.randint(3, 320, (1, 10))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :10], model(x).logits)
    with pytest.raises(ValueError, match="right padding"):
        model(padded, attention_mask=mask.flip(1))


def test_sequence_longer_than_positions_is_a_clear_error():
    model = QBenchForCausalLM(small_config())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 40, dtype=torch.long))


def test_arm_parameters_are_declared_by_the_arm_and_keep_their_state_dict_names():
    """sink_logit is the normaliser's declared parameter: created per query head at its
    init in a qbench model, at its neutral value in a retrofit, and nowhere else."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbench.modeling.attention import ATTENTION_ARMS
    from qbench.modeling.llama_arms import arm_parameter_names, install_arm

    (sink,) = ATTENTION_ARMS["sink_logit"].parameters
    assert sink.name == "sink_logit" and all(not a.parameters for n, a in ATTENTION_ARMS.items() if n != "sink_logit")
    state = QBenchForCausalLM(small_config(attention="sink_logit")).state_dict()
    assert [k for k in state if "sink" in k] == ["model.layers.0.attn.sink_logit", "model.layers.1.attn.sink_logit"]
    assert all(torch.equal(state[k], torch.full((2,), sink.init)) for k in state if "sink" in k)
    assert not [k for k in QBenchForCausalLM(small_config(attention="softmax")).state_dict() if "sink" in k]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    install_arm(llama, "sink_logit")
    assert arm_parameter_names(llama) == ["model.layers.0.self_attn.sink_logit"]
    assert torch.equal(llama.model.layers[0].self_attn.sink_logit.data, torch.full((4,), sink.neutral))
