"""The retrofit (qbench.retrofit, qbench.modeling.llama_arms) on a tiny random Llama with
grouped-query attention: identity at step 0 for every arm, a few CPU steps, deltas that
save and load against the base's checksum, a control that differs only in the arm."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qbench.modeling.llama_arms import GATE_SCALE, RETROFIT_ARMS, arm_parameter_names, install_arm

VOCAB = 320


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arm", RETROFIT_ARMS)
def test_the_retrofitted_model_equals_the_original_at_step_0(arm):
    base = _llama()
    ids = _ids()
    ref = _logits(base, ids)
    model = copy.deepcopy(base)
    install_arm(model, arm)
    out = _logits(model, ids)
    # The gate is exactly 1 (2 sigmoid(0)); the sink adds exp(-30) = 9e-14 of a row whose
    # largest score is >= the others.  What is left is float32 rounding of a different
    # summation order (explicit P V instead of SDPA): a few ulps of the logits' scale.
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale
    assert GATE_SCALE * torch.sigmoid(torch.zeros(())) == 1.0


@pytest.mark.parametrize("arm", [a for a in RETROFIT_ARMS if a not in ("softmax", "sink_logit")])
def test_every_gated_arm_changes_the_model_once_its_gate_moves_and_has_its_layout(arm):
    model = _llama()
    install_arm(model, arm)
    attn = model.model.layers[0].self_attn
    key_side = arm in ("vga", "vga_x")
    assert attn.qbench_gate.out_features == (2 if key_side else 4)  # KV heads vs query heads under GQA
    assert attn.qbench_gate.in_features == (attn.v_proj.out_features if arm.startswith("vga") and arm != "vga_x" else 64)
    ids = _ids()
    before = _logits(model, ids)
    with torch.no_grad():
        attn.qbench_gate.bias.fill_(-3.0)
    assert (_logits(model, ids) - before).abs().max().item() > 1e-3


def test_the_gate_of_a_key_side_arm_closes_one_kv_head_for_its_whole_query_group():
    """vga under GQA: closing KV head 0's gate at every token zeroes the value that query
    heads 0 and 1 read, and leaves heads 2 and 3 as they were."""
    model = _llama()
    install_arm(model, "vga")
    attn = model.model.layers[0].self_attn
    seen = {}

    class Context:
        def scores(self, x): return x
        def probs(self, x): return x
        def context(self, x):
            seen["ctx"] = x.detach().clone()
            return x

    attn.qbench_hooks = Context()
    ids = _ids()
    _logits(model, ids)
    open_ctx = seen["ctx"]
    with torch.no_grad():
        attn.qbench_gate.bias.copy_(torch.tensor([-1e4, 0.0]))  # KV head 0 closed, 1 open
    _logits(model, ids)
    closed = seen["ctx"]
    assert closed[:, :2].abs().max().item() == 0.0
    assert torch.equal(closed[:, 2:], open_ctx[:, 2:])


def test_smoothquant_and_rotation_see_an_input_gate_as_a_reader_of_the_norm():
    """qwen_g1's gate reads the normed input, so SmoothQuant must scale it like q/k/v: with
    a trained-looking gate the transform leaves the float model unchanged."""
    from qbench.quant.rotation import rotate
    from qbench.quant.smoothquant import smooth

    for transform in ("smooth", "rotate"):
        model = _llama().double()
        install_arm(model, "qwen_g1")
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.qbench_gate.weight.normal_(0, 0.3)
                layer.input_layernorm.weight.uniform_(0.1, 2.0)
        ids = _ids()
        before = _logits(model, ids)
        if transform == "smooth":
            smooth(model, [_ids(s) for s in range(3)], alpha=0.5)
        else:
            rotate(model, seed=0)
        after = _logits(model, ids)
        # Llama's RMSNorm computes in float32 even in a float64 model: float32 rounding (2^-24
        # relative) through two layers, as in test_ptq; a gate left out of the readers errs by O(1)
        assert (after - before).abs().max().item() <= 1e-5 * before.abs().max().item(), transform


# -- the fine-tune on CPU ---------------------------------------------------------------

@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, small_corpus):
    """A tiny random Llama with a BPE tokenizer of the small corpus, saved as a checkpoint."""
    from qbench.data import load_corpus
    from qbench.data.tokenizer import train_bpe_tokenizer

    corpus = load_corpus(str(small_corpus))
    tokenizer = train_bpe_tokenizer(corpus.train, VOCAB)
    folder = tmp_path_factory.mktemp("llama") / "tiny-llama"
    model = _llama()
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _recipe(small_corpus, **changes):
    from qbench.retrofit import get_recipe

    settings = {"steps": 4, "batch_size": 2, "context": 32, "save_every": 2, "log_every": 1, "warmup": 1,
                "corpus": str(small_corpus), **changes}
    return get_recipe("retrofit-pilot", settings)


def test_a_few_steps_train_the_gates_and_the_deltas_reload_exactly(base_folder, small_corpus, tmp_path):
    from safetensors.torch import load_file

    from qbench.retrofit import DELTAS_FILE, load_retrofit, retrofit
    from qbench.zoo import resolve_model

    out = tmp_path / "rf-vga"
    facts = retrofit(str(base_folder), "vga", _recipe(small_corpus), seed=0, out=out, progress=False)
    deltas = load_file(str(out / DELTAS_FILE))
    assert set(deltas) == set(facts["trainable"]) and facts["trainable"]
    assert all(".qbench_gate." in n for n in deltas)  # gates only: the base's weights are not stored
    assert max(t.abs().max().item() for t in deltas.values()) > 0  # the gates moved from 0
    loaded = load_retrofit(out)
    ref = resolve_model(str(out))  # `--model PATH` of a retrofit folder
    assert ref.checkpoint_hash == loaded.checkpoint_hash and ref.info["arm"] == "vga (retrofit)"
    model = _llama()
    install_arm(model, "vga")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in deltas:
                p.copy_(deltas[n])
    assert torch.equal(_logits(loaded.model, _ids()), _logits(model, _ids()))
    assert (out / "gate_log.csv").read_text().count("\n") == 4 + 1 + 1  # header, steps 0-3, final


def test_the_base_checksum_is_checked(base_folder, small_corpus, tmp_path):
    from qbench.retrofit import CONFIG_FILE, load_retrofit, retrofit
    from qbench.zoo import CheckpointError

    out = tmp_path / "rf"
    retrofit(str(base_folder), "vga_out", _recipe(small_corpus, steps=1), seed=0, out=out, progress=False)
    facts = json.loads((out / CONFIG_FILE).read_text())
    facts["base_checkpoint_hash"] = "0" * 16
    (out / CONFIG_FILE).write_text(json.dumps(facts))
    with pytest.raises(CheckpointError, match="checkpoint hash"):
        load_retrofit(out)


def test_the_control_differs_only_in_the_arm(base_folder, small_corpus, tmp_path):
    """Same seed: the same batches in the same order (the chained digest of every batch),
    the same recipe; the control adds and trains no parameter, so it is the base."""
    from qbench.retrofit import load_retrofit, retrofit

    recipe = _recipe(small_corpus)
    runs = {arm: retrofit(str(base_folder), arm, recipe, seed=3, out=tmp_path / arm, progress=False)
            for arm in ("softmax", "sink_logit")}
    assert runs["softmax"]["data_order_sha256"] == runs["sink_logit"]["data_order_sha256"]
    other_seed = retrofit(str(base_folder), "softmax", recipe, seed=4, out=tmp_path / "s4", progress=False)
    assert other_seed["data_order_sha256"] != runs["softmax"]["data_order_sha256"]
    differ = {k for k in runs["softmax"] if runs["softmax"][k] != runs["sink_logit"][k]}
    assert differ <= {"arm", "trainable", "seconds", "threads", "library_versions"}, differ
    assert runs["softmax"]["trainable"] == [] and runs["sink_logit"]["trainable"]
    control = load_retrofit(tmp_path / "softmax").model
    base = LlamaForCausalLM.from_pretrained(base_folder).eval()
    assert torch.allclose(_logits(control, _ids()), _logits(base, _ids()),
                          atol=64 * torch.finfo(torch.float32).eps * _logits(base, _ids()).abs().max().item())


def test_an_interrupted_fine_tune_resumes_to_the_same_deltas(base_folder, small_corpus, tmp_path, monkeypatch):
    import qbench.retrofit as rf
    import qbench.retrofit.loop as loop
    from safetensors.torch import load_file

    recipe = _recipe(small_corpus)
    whole = rf.retrofit(str(base_folder), "qwen_g1", recipe, seed=0, out=tmp_path / "whole", progress=False)
    calls = {"n": 0}
    real = loop.gate_snapshot

    def dies_at_step_3(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # the snapshot before step 3 (state saved after step 2)
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(loop, "gate_snapshot", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        rf.retrofit(str(base_folder), "qwen_g1", recipe, seed=0, out=tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / rf.STATE_FILE).exists()
    monkeypatch.setattr(loop, "gate_snapshot", real)
    again = rf.retrofit(str(base_folder), "qwen_g1", recipe, seed=0, out=tmp_path / "cut", progress=False)
    assert again["data_order_sha256"] == whole["data_order_sha256"]
    a, b = load_file(str(tmp_path / "whole" / rf.DELTAS_FILE)), load_file(str(tmp_path / "cut" / rf.DELTAS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="holds a retrofit with other .*arm"):
        _resume_with_other_arm(rf, base_folder, recipe, tmp_path)


def _resume_with_other_arm(rf, base_folder, recipe, tmp_path):
    out = tmp_path / "half"
    out.mkdir()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(out / rf.STATE_FILE))  # an old-style state: the step in a second file
    (out / rf.STATE_META).write_text(json.dumps({"base": str(base_folder), "arm": "vga_out", "step": 1}))
    rf.retrofit(str(base_folder), "vga", recipe, seed=0, out=out, progress=False)


def test_recipes_are_listed_and_bad_ones_refused(small_corpus):
    from qbench.cli import main
    from qbench.retrofit import get_recipe

    with pytest.raises(ValueError, match="trainable"):
        get_recipe("retrofit-pilot", {"trainable": "everything"})
    with pytest.raises(ValueError, match="unknown retrofit recipe key"):
        get_recipe("retrofit-pilot", {"stepz": 3})
    with pytest.raises(ValueError, match="unknown retrofit recipe"):
        get_recipe("retrofit-pilt")
    assert get_recipe("retrofit-pilot", {"trainable": "arm+layers:0-1"}).trainable == "arm+layers:0-1"
    assert main(["retrofit", "--arm", "vga", "--preset", "nope", "--out", "/tmp/x"]) == 2


def test_trainable_layers_are_stored_and_an_unknown_arm_is_refused(base_folder, small_corpus, tmp_path):
    from safetensors.torch import load_file

    from qbench.retrofit import DELTAS_FILE, retrofit

    out = tmp_path / "layers"
    retrofit(str(base_folder), "vga", _recipe(small_corpus, steps=1, trainable="arm+layers:1-1", base_lr=1e-3),
             seed=0, out=out, progress=False)
    names = set(load_file(str(out / DELTAS_FILE)))
    assert "model.layers.1.mlp.down_proj.weight" in names and not any(n.startswith("model.layers.0.mlp") for n in names)
    with pytest.raises(ValueError, match="cannot be retrofitted"):
        install_arm(_llama(), "softpick")
    assert arm_parameter_names(_llama()) == []


def test_the_study_section_applies_the_decision_rule_to_the_records(tmp_path):
    from qbench.study.retrofit import PROTOCOL, decide, parse, retrofit_section

    assert parse("smollm2-rf-pilot-vga_out-s1") == {"recipe": "pilot", "arm": "vga_out", "seed": 1}
    assert parse("smollm2-rf-sink_logit-s0") == {"recipe": "main", "arm": "sink_logit", "seed": 0}
    assert parse("smollm2-135m") is None
    assert decide([1.0, 2.0], [2.5, 3.0]).startswith("reduces")
    assert decide([1.0, 2.6], [2.5, 3.0]).startswith("not shown")  # one cell above a control cell
    assert decide([], [1.0]) == "not measured"

    def ppl(model, scheme, value, seed=0):
        return {"model": model, "scheme": scheme, "task": "ppl", "status": "ok", "protocol": PROTOCOL,
                "calibration_seed": seed, "metrics": {"ppl": value}}

    records = [ppl("smollm2-135m", "fp32", 20.0), ppl("smollm2-135m", "w8a8-pt", 80.0),
               ppl("smollm2-rf-pilot-softmax-s0", "fp32", 20.0),
               ppl("smollm2-rf-pilot-vga-s0", "fp32", 21.0)]
    records += [ppl("smollm2-rf-pilot-softmax-s0", "w8a8-pt", v, i) for i, v in enumerate([80.0, 78.0, 82.0])]
    records += [ppl("smollm2-rf-pilot-vga-s0", "w8a8-pt", v, i) for i, v in enumerate([42.0, 42.0, 84.0])]
    text = retrofit_section(records, tmp_path)
    assert "| smollm2-rf-pilot-vga-s0 | 21.000 | +5.00 | +166.7 ± 115.5 (n=3) |" in text
    # 84 / 21 = +300% lies above the control's +290%
    assert "| pilot | vga | 1 | +300.0 / +290.0 (3 vs 3) | not shown" in text


@pytest.mark.parametrize("arm", RETROFIT_ARMS)
def test_the_low_precision_kernel_composes_the_retrofitted_arm(arm):
    """Under w8a8-attn an identity-initialised arm gives the plain model's quantized logits
    (a gate of exactly 1 is 255/255 on the kernel's gate grid; re-quantizing 1 * V_deq
    recovers V's codes), and a closed key-side gate zeroes its KV group inside the kernel."""
    from qbench.quant import quantize

    ids = _ids()
    plain = _llama()
    quantize(plain, "w8a8-attn")
    model = _llama()
    install_arm(model, arm)
    facts = quantize(model, "w8a8-attn")
    assert facts["lowbit_attention_modules"] == 2
    want, got = _logits(plain, ids), _logits(model, ids)
    # equal up to float32 rounding of the dequantized values (a few ulps of the logits' scale)
    assert (got - want).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * want.abs().max().item()
    if arm == "vga":
        attn = model.model.layers[0].self_attn
        seen = {}

        class First:
            def scores(self, x): return x
            def probs(self, x): return x
            def context(self, x): return x
            def first_column(self, p): pass
            def gate(self, layer, g): seen["gate"] = g

        attn.qbench_hooks = First()
        with torch.no_grad():
            attn.qbench_gate.bias.copy_(torch.tensor([-1e4, 0.0]))
        _logits(model, ids)
        assert seen["gate"].shape == (2, 2, 24, 1) and seen["gate"][:, 0].max().item() == 0.0


def test_a_committed_retrofit_resolves_by_zoo_name_in_a_fresh_interpreter():
    """The zoo registers the retrofit folder kind lazily ("module:function"): a process that
    imported nothing of qbench.retrofit still resolves a retrofit by name, on its base."""
    import subprocess
    import sys

    from qbench.zoo import read_zoo

    names = [n for n, e in read_zoo().items() if e.get("base")]
    if not names:
        pytest.skip("no retrofit in the zoo")
    code = ("import sys; from qbench.zoo import resolve_model; r = resolve_model(sys.argv[1]); "
            "print(r.name, r.checkpoint_hash)")
    done = subprocess.run([sys.executable, "-c", code, names[0]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [names[0], read_zoo()[names[0]]["checkpoint_hash"]]


def test_the_optimizer_groups_come_from_what_each_arm_declares(small_corpus, monkeypatch):
    """A sink logit trains at `sink_lr` with the Adam epsilon it declares (1e-30, else its
    exp(s)-scaled gradient gives no update); a parameter another normaliser declares would get
    its own group the same way, never the base weights' decay and learning rate."""
    from qbench.modeling import attention
    from qbench.retrofit.recipes import trainable_names
    from qbench.retrofit.state import build_optimizer

    recipe = _recipe(small_corpus, trainable="arm+norms")
    model = _llama()
    install_arm(model, "sink_logit")
    groups = {g["name"]: g for g in build_optimizer(model, trainable_names(model, "arm+norms"), recipe).param_groups}
    sink = groups["arm:sink_logit"]
    assert sink["eps"] == 1e-30 and sink["lr"] == recipe.sink_lr and sink["weight_decay"] == 0.0
    assert len(sink["params"]) == model.config.num_hidden_layers
    assert all(p.dim() == 1 for p in groups["base"]["params"])  # the norms only
    declared = attention.ArmParameter("sink_logit", attention.per_query_head, init=0.0, neutral=-30.0, adam_eps=1e-20)
    monkeypatch.setitem(attention.NORMALISER_PARAMETERS, "sink_logit", (declared,))
    groups = {g["name"]: g for g in build_optimizer(model, trainable_names(model, "arm+norms"), recipe).param_groups}
    assert groups["arm:sink_logit"]["eps"] == 1e-20
