"""The one module that knows model families (qbench.modeling.families): per family, the
modules it hands out are the model's own; nothing else in the package branches on a
family; observers chain after the hooks already there; arm parameters are declared."""
import ast

import pytest
import torch

from qbench.modeling import QBenchConfig, QBenchForCausalLM
from qbench.modeling.families import (FAMILIES, UnsupportedModel, attention_modules, decoder_layers, family_of,
                                      layer_points, residual_structure, residual_sums)
from qbench.paths import REPO_ROOT

LAYERS = 2


def _qbench(arm="softmax"):
    torch.manual_seed(0)
    return QBenchForCausalLM(QBenchConfig(vocab_size=100, n_layer=LAYERS, n_head=2, d_model=32, d_ff=64,
                                          attention=arm, max_position_embeddings=16)).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=16)).eval()


def test_qbench_family_points_at_the_qbench_modules():
    model = _qbench("qwen_g1")
    assert family_of(model).name == "qbench"
    layers = list(model.model.layers)
    assert decoder_layers(model) == layers
    assert attention_modules(model) == [layer.attn for layer in layers]
    for layer, points in zip(layers, layer_points(model)):
        assert (points.attention_input, points.attention_output, points.mlp_input, points.mlp_output) == (
            layer.attn_norm, layer.attn.o_proj, layer.mlp_norm, layer.mlp.fc2)
        assert points.attention_residual is layer.attn_residual and points.layer is layer
        assert points.value_projection is layer.attn.v_proj and points.value_heads == 2
    assert residual_sums(model) == ["model.embed_sum"] + [f"model.layers.{i}.{s}" for i in range(LAYERS)
                                                          for s in ("attn_residual", "mlp_residual")]
    for name in residual_sums(model):
        assert isinstance(model.get_submodule(name), torch.nn.Identity)


@pytest.mark.parametrize("arm,gate_reads_input", [("softmax", False), ("vga", False), ("qwen_g1", True),
                                                  ("iga", True)])
def test_qbench_structure_lists_every_norm_its_readers_and_writer(arm, gate_reads_input):
    model = _qbench(arm)
    s = residual_structure(model, "smoothquant")
    assert s.family == "qbench" and s.layer_norm
    assert [n for n, _ in s.embeddings] == ["model.embed_tokens", "model.embed_positions"]
    assert s.final_norm == ("model.final_norm", model.model.final_norm) and s.head == ("lm_head", model.lm_head)
    assert [g.name for g in s.groups] == [f"model.layers.{i}.{n}" for i in range(LAYERS)
                                          for n in ("attn_norm", "mlp_norm")]
    for group in s.groups:  # every name points at the module handed out with it
        assert model.get_submodule(group.name) is group.norm
        assert all(model.get_submodule(n) is m for n, m in group.readers + group.writers)
    attn = s.groups[0]
    assert [n.rsplit(".", 1)[1] for n, _ in attn.readers] == ["q_proj", "k_proj", "v_proj"] + (
        ["gate_proj"] if gate_reads_input else [])
    assert [n for n, _ in attn.writers] == ["model.layers.0.attn.o_proj"]
    assert [n for n, _ in s.groups[1].readers] == ["model.layers.0.mlp.fc1"]


@pytest.mark.parametrize("arm", [None, "qwen_g1", "vga"])
def test_llama_family_points_at_the_llama_modules(arm):
    model = _llama()
    if arm is not None:
        from qbench.modeling.llama_arms import install_arm

        install_arm(model, arm)
    assert family_of(model).name == "llama"
    layers = list(model.model.layers)
    assert decoder_layers(model) == layers and attention_modules(model) == [layer.self_attn for layer in layers]
    for layer, points in zip(layers, layer_points(model)):
        assert (points.attention_input, points.attention_output, points.mlp_input, points.mlp_output) == (
            layer.input_layernorm, layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp.down_proj)
        assert points.attention_residual is None and points.layer is layer
        assert points.value_projection is layer.self_attn.v_proj and points.value_heads == 2  # the KV heads
    assert residual_sums(model) == []
    s = residual_structure(model, "rotation")
    assert s.family == "llama" and not s.layer_norm
    assert [n for n, _ in s.embeddings] == ["model.embed_tokens"]
    assert s.final_norm == ("model.norm", model.model.norm) and s.head == ("lm_head", model.lm_head)
    attn, mlp = s.groups[0], s.groups[1]
    assert attn.name == "model.layers.0.input_layernorm" and mlp.name == "model.layers.0.post_attention_layernorm"
    assert [n.rsplit(".", 1)[1] for n, _ in attn.readers] == ["q_proj", "k_proj", "v_proj"] + (
        ["qbench_gate"] if arm == "qwen_g1" else [])  # a gate from the normed input reads the norm
    assert [n for n, _ in mlp.readers] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert mlp.writers == [("model.layers.0.mlp.down_proj", layers[0].mlp.down_proj)]
    for group in s.groups:
        assert all(model.get_submodule(n) is m for n, m in [(group.name, group.norm)] + group.readers)


def test_gpt2_family_has_probe_points_and_transforms_once_its_conv1d_are_linears():
    model = _gpt2()
    assert family_of(model).name == "gpt2"
    layers = list(model.transformer.h)
    assert attention_modules(model) == [layer.attn for layer in layers]
    for layer, points in zip(layers, layer_points(model)):
        assert (points.attention_input, points.attention_output, points.mlp_input, points.mlp_output) == (
            layer.ln_1, layer.attn.c_proj, layer.ln_2, layer.mlp.c_proj)
        assert points.value_projection is None and points.value_heads == 0  # fused into c_attn
    with pytest.raises(UnsupportedModel, match="Conv1D"):
        residual_structure(model, "rotation")
    from qbench.quant import linearize_conv1d

    linearize_conv1d(model)
    s = residual_structure(model, "rotation")
    assert [n for n, _ in s.groups[0].readers] == ["transformer.h.0.attn.c_attn"] and s.layer_norm
    assert [n for n, _ in s.embeddings] == ["transformer.wte", "transformer.wpe"]


def test_an_unknown_model_is_a_clear_error_naming_the_model_types():
    from qbench.modeling.families import MODEL_TYPES

    with pytest.raises(UnsupportedModel, match=", ".join(sorted(MODEL_TYPES))):
        family_of(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# -- nothing outside the families module branches on a family ---------------------------

# Files that define a layout themselves: the qbench model names its submodules, the
# retrofit the attributes it adds to a stock attention module.
_DEFINES_A_LAYOUT = {"qbench/modeling/families.py", "qbench/modeling/model.py", "qbench/modeling/llama_arms.py"}
# What an attention module exposes to the hooks and arms (q/k/v/o projections, its arm),
# and names that are also fields of the families' own records: not a layout choice.
# `norm` (Llama's final norm) is every tensor's `.norm()` too.
# `attention` (GPT-NeoX's module) is the concept's name everywhere; `decoder` (OPT's) a tokenizer's too.
_INTERFACE = {"q_proj", "k_proj", "v_proj", "o_proj", "arm", "layers", "attn", "mlp", "final_norm", "norm",
              "attention", "decoder"}


def _layout_names() -> set[str]:
    names = set()
    for family in FAMILIES.values():
        for key, value in vars(family).items():
            if key in ("name", "model_types", "refuses", "config_refusals"):  # identity and reasons, not paths
                continue
            for path in value if isinstance(value, tuple) else (value,):
                if isinstance(path, str):
                    names.update(path.split("."))
    # GPT-2's base model (`transformer`), reached through `model.base_model` in the families
    return (names | {"transformer"}) - _INTERFACE - set(FAMILIES) - {"", "layer", "rms"}


def test_no_module_outside_the_families_module_names_a_model_layout():
    """A layout name (`input_layernorm`, `transformer`, `ln_1`, `attn_residual`, ...) as an
    attribute or a string, a family name compared, or an isinstance check on a model or
    attention class, anywhere in the package but the families module and the qbench model."""
    from qbench.probes.sites import SITES

    layout = _layout_names()
    assert {"input_layernorm", "ln_1", "attn_norm", "embed_sum", "down_proj", "h", "transformer"} <= layout
    layout_strings = layout - set(SITES)  # the probes' site names are record keys ("attn_residual")
    found = []
    for path in sorted((REPO_ROOT / "qbench").rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).as_posix()
        if rel in _DEFINES_A_LAYOUT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in layout:
                found.append(f"{rel}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in layout_strings:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops) and any(
                    isinstance(c, ast.Constant) and c.value in FAMILIES for c in [node.left, *node.comparators]):
                found.append(f"{rel}:{node.lineno} compares a family name")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and any(
                    isinstance(n, ast.Name) and n.id.endswith(("ForCausalLM", "LMHeadModel", "Model", "Attention"))
                    for n in ast.walk(node.args[1])):
                found.append(f"{rel}:{node.lineno} isinstance on a model class")
    assert not found, found


# -- observers chain after the hooks already there (qbench.modeling.hooks) ----------------

class _Scale(torch.nn.Module):
    """A stand-in quantizer's hooks: replaces the scores by a multiple of them."""

    first_column_only = False

    def __init__(self, factor):
        super().__init__()
        self.factor, self.gates = factor, []

    def scores(self, x):
        return x * self.factor

    def probs(self, x):
        return x

    def context(self, x):
        return x

    def gate(self, layer, g):
        self.gates.append(layer)


def _observe(model, factor):
    from qbench.modeling.hooks import ObserverHooks, attention_layers, observing

    class Record(ObserverHooks):
        def observe_scores(self, x):
            seen.setdefault("scores", x)

        def observe_probs(self, x):
            seen.setdefault("probs", x)

        def observe_gate(self, layer, g):
            seen.setdefault("gates", []).append(layer)

    seen, implementation = {}, model.config._attn_implementation
    inner = {}
    for index, module in attention_layers(model):
        module.qbench_hooks = inner[index] = _Scale(factor)
    if implementation != model.config._attn_implementation:  # a stock model: the observer must restore this
        model.set_attn_implementation(implementation)
    with observing(model, lambda index, module, hooks: Record(hooks)) as layers:
        assert all(isinstance(module.qbench_hooks, Record) and module.qbench_hooks.inner is inner[index]
                   for index, module in layers)
        with torch.no_grad():
            model(input_ids=torch.arange(3, 11)[None])
    assert all(module.qbench_hooks is inner[index] for index, module in layers)  # the quantizer's hooks are back
    assert model.config._attn_implementation == implementation
    return seen, inner


@pytest.mark.parametrize("family", ["qbench", "llama"])
def test_observers_see_what_the_hooks_before_them_made_and_leave_them_in_place(family):
    model = _qbench("vga") if family == "qbench" else _llama()
    one, _ = _observe(model, 1.0)
    half, inner = _observe(model, 0.5)
    torch.testing.assert_close(half["scores"], one["scores"] * 0.5)  # after the inner hooks replaced them
    torch.testing.assert_close(half["probs"], torch.softmax(half["scores"].float(), -1))  # P from those scores
    if family == "qbench":  # gated: both the observer and the hooks before it see every layer's gate
        assert half["gates"] == list(range(LAYERS)) and inner[0].gates == [0] and inner[1].gates == [1]


def test_windows_start_with_bos_else_eos():
    from types import SimpleNamespace

    from qbench.data.tokens import first_token_id

    assert first_token_id(SimpleNamespace(bos_token_id=1, eos_token_id=2)) == 1
    assert first_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=50256)) == 50256  # GPT-2's tokenizer
    assert first_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=None)) is None
