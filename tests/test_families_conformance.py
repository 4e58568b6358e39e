"""Every model family qbench describes (qbench.modeling.families), built at test time from a
tiny transformers config (random weights, hidden 64, 2 layers, vocabulary 96; no download):

(a) routing attention through qbench (hooks.hf_attention) at no quantization gives the
    model's own logits (eager attention) to float tolerance;
(b) every function-preserving transform the family takes (SmoothQuant's fold, the Hadamard
    rotation) leaves its fp32 logits unchanged to float tolerance, and one it cannot take
    is refused with the planner's reason;
(c) every group of registered schemes (grouped by what they need of the layout,
    qbench.quant.support) runs on it or is refused at planning; a refused cell is a failed
    record written once, without loading the model.

Tolerance, relative to the largest |logit|: 1e-5.  (a) runs in float32: each path computes
the same float32 operations in another order (repeated K/V heads, mask added vs filled);
a reordered float32 sum of n terms differs by about sqrt(n) * 2^-24 of its magnitude, a few
1e-7 over two layers and a 64-wide stream (measured: up to 4e-7).  (b) runs in float64, so
that the transform's own error (1e-15) is not hidden under float32 rounding that a rotation
amplifies (Falcon's fp32 logits move 1.4e-5 under a rotation that is exact to 2e-14 in
float64); norms that compute in float32 even in a float64 model (Llama's, Gemma's) add
2^-24 per layer.  The bugs guarded against are 1e-3 and above (Gemma2's dropped
soft-cap; SmoothQuant folded into w instead of 1 + w, order 1).
"""
import pytest
import torch

from qbench.modeling.families import FAMILIES, MODEL_TYPES

TOL = 1e-5
TOKENS = 12
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# per model type: its config's own names and the features its family must honour (sliding
# windows shorter than the sequence; Gemma2's soft-capping made to bite at this scale)
CONFIGS = {
    "llama": {},
    "mistral": dict(sliding_window=5),
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(head_dim=32),
    "gemma": dict(head_dim=32),
    "gemma2": dict(head_dim=32, sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=8.0,
                   query_pre_attn_scalar=32),
    "gemma3_text": dict(head_dim=32, sliding_window=5, query_pre_attn_scalar=32),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=2, n_positions=64, n_inner=128),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt_neox": dict(rotary_pct=0.5),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": dict(sliding_window=5),
    "olmo2": {},
    "falcon": dict(num_kv_heads=1),
    "qbench": dict(n_layer=2, n_head=2, d_model=64, d_ff=128, attention="softmax"),
}
ROUTED = [t for t in CONFIGS if MODEL_TYPES[t].refusal("attention") is None]


def build(model_type: str, seed: int = 0):
    """A tiny model of `model_type` with weights drawn so every part matters: norm scales
    around 1 (Gemma: w around 0, its scale 1 + w), biases and linears of unit gain."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import qbench.modeling  # noqa: F401  registers the qbench model type

    kwargs = {**COMMON, **CONFIGS[model_type]} if model_type != "qbench" else {
        "vocab_size": VOCAB, "max_position_embeddings": 64, **CONFIGS[model_type]}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    offset = MODEL_TYPES[model_type].norm_offset
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                scale = 1.0 - offset if name.endswith("weight") else 0.0
                p.copy_(scale + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] if p.shape[0] != VOCAB else 1) ** 0.5)
    return model


def tokens(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_every_family_is_configured_here():
    assert set(CONFIGS) == set(MODEL_TYPES)
    assert {f.name for f in FAMILIES.values()} == {MODEL_TYPES[t].name for t in CONFIGS}


# -- (a) attention routed through qbench reproduces the model's own -------------------------

@pytest.mark.parametrize("model_type", ROUTED)
def test_routing_attention_through_qbench_reproduces_the_model(model_type):
    from qbench.modeling.hooks import attention_layers

    model, ids = build(model_type), tokens()
    expected = logits(model, ids)
    layers = attention_layers(model)  # stock models switch to the "qbench" implementation
    assert len(layers) == 2
    seen = []
    for _, module in layers:  # proof the qbench path ran: hooks see the scores
        module.qbench_hooks = _Seen(seen)
    assert relative(logits(model, ids), expected) < TOL
    assert len(seen) == 2


class _Seen(torch.nn.Module):
    first_column_only = False

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def scores(self, x):
        self.seen.append(x.shape)
        return x

    def probs(self, x):
        return x

    def context(self, x):
        return x


def test_a_family_whose_attention_is_its_own_is_refused_not_silently_unrouted():
    from qbench.modeling.families import UnsupportedModel
    from qbench.modeling.hooks import attention_layers

    with pytest.raises(UnsupportedModel, match="not through transformers' attention interface"):
        attention_layers(build("falcon"))


def test_attention_arguments_are_honoured_or_refused():
    from qbench.modeling.hooks import hf_attention

    model = build("llama")
    module = model.model.layers[0].self_attn
    q, k, v = (torch.randn(1, 4, 6, 16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    for kwargs, error in ((dict(dropout=0.1), "dropout"), (dict(s_aux=torch.zeros(4)), "sinks"),
                          (dict(alibi=torch.zeros(1)), "alibi")):
        with pytest.raises(NotImplementedError, match=error):
            hf_attention(module, q, k, v, None, **kwargs)
    plain, _ = hf_attention(module, q, k, v, None, scaling=0.25)
    window, _ = hf_attention(module, q, k, v, None, scaling=0.25, sliding_window=2)
    capped, _ = hf_attention(module, q, k, v, None, scaling=0.25, softcap=0.5)
    torch.testing.assert_close(window[:, :2], plain[:, :2])  # the first two queries see at most 2 keys
    assert not torch.allclose(window[:, 2:], plain[:, 2:]) and not torch.allclose(capped, plain)


# -- (b) function-preserving transforms ------------------------------------------------------

def _calibration(n: int, seed: int, batch_size: int):
    return [tokens(seed + i, batch_size) for i in range(min(n, 2))]


def _transform(model, need: str):
    from qbench.quant import linearize_conv1d
    from qbench.quant.rotation import rotate
    from qbench.quant.smoothquant import smooth

    linearize_conv1d(model)
    if need == "smoothquant":
        smooth(model, _calibration(2, 5, 2), alpha=0.5)
    else:
        rotate(model, seed=0)


@pytest.mark.parametrize("need", ["smoothquant", "rotation"])
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_function_preserving_transforms_leave_the_float_model_unchanged_or_are_refused(model_type, need):
    from qbench.modeling.families import UnsupportedModel
    from qbench.quant.support import default_config

    model, ids = build(model_type).double(), tokens()
    why = MODEL_TYPES[model_type].refusal(need, model.config.to_dict())
    assert why == MODEL_TYPES[model_type].refusal(need, default_config(model_type))  # the table's verdict
    if why is not None:
        with pytest.raises(UnsupportedModel, match=why[:40]):
            _transform(model, need)
        return
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        _transform(model, need)
        assert relative(model(input_ids=ids).logits, expected) < TOL


# -- (c) every scheme runs or is refused at planning ------------------------------------------

# per group of schemes (qbench.quant.support.scheme_groups), those that exercise what the
# layout decides: the linears (all groups), the attention sites, the low-precision kernel, the
# KV cache with and without an exact window and sink, each transform and its compositions.
# Weight-only methods (RTN, GPTQ, AWQ, HQQ) and the library backends swap the same linears
# w8a8-dyn does; bitsandbytes needs its package.
REPRESENTATIVES = ("w8a8-dyn", "w8a8-attn", "w8a8-pt", "kv4", "kv2-kivi-g32-r32-sink1", "w8a8-sq", "w8a8-had",
                   "w8a8-pt-sq", "w8a8-pt-had")


def test_the_representatives_cover_every_group_of_schemes():
    from qbench.quant.support import scheme_groups

    for needs, names in scheme_groups().items():
        assert set(names) & set(REPRESENTATIVES), f"no representative runs the schemes needing {needs}: {names}"


def _run(model, scheme_name: str) -> torch.Tensor:
    from dataclasses import replace

    from qbench.quant import get_scheme, quantize

    scheme = get_scheme(scheme_name)
    if "calibration_batches" in scheme.options:  # two small batches are enough to run it
        scheme = replace(scheme, options={**scheme.options, "calibration_batches": 2, "calibration_batch_size": 2})
    quantize(model, scheme, _calibration)
    return logits(model, tokens())


@pytest.mark.parametrize("scheme_name", REPRESENTATIVES)
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_every_scheme_group_runs_or_is_refused_at_planning(model_type, scheme_name):
    from qbench.quant import get_scheme
    from qbench.quant.support import planning_refusal

    model = build(model_type)
    why = planning_refusal(model.config.to_dict(), get_scheme(scheme_name))
    if why is not None:  # the planner refuses it; the runtime refuses it too (never a silent wrong number)
        with pytest.raises((ValueError, NotImplementedError)):
            _run(model, scheme_name)
        return
    out = _run(model, scheme_name)
    assert out.shape == (2, TOKENS, VOCAB) and torch.isfinite(out).all()


def test_a_refused_cell_is_recorded_once_without_loading_the_model(tmp_path, monkeypatch):
    from qbench.runner import run_cells
    from qbench.plan import plan_cells
    from qbench.results import ResultStore
    from qbench.zoo import ModelRef

    folder = tmp_path / "olmo2"
    build("olmo2").save_pretrained(folder)
    planned = plan_cells([str(folder)], ["w8a8-sq", "w8a8-had"], ["ppl"])
    assert all("OLMo2" in p.refused or "olmo2" in p.refused for p in planned)
    assert "no norm to fold" in planned[0].refused and "no linear after them" in planned[1].refused

    def no_load(self):
        raise AssertionError("a refused cell loaded its model")

    monkeypatch.setattr(ModelRef, "load", no_load)
    store = ResultStore(tmp_path / "results")
    records = run_cells(planned, store, progress=False)
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all(r["error"].startswith("UnsupportedModel: refused at planning: w8a8-") for r in records)
    written = {p: p.stat().st_mtime_ns for p in store.records_dir.glob("*.json")}
    assert len(written) == 2
    monkeypatch.setattr(ResultStore, "put", lambda self, record: pytest.fail("a stored refusal was recomputed"))
    assert run_cells(plan_cells([str(folder)], ["w8a8-sq", "w8a8-had"], ["ppl"]), store, progress=False) == records


def test_the_readme_table_is_the_planner_s_verdict():
    from qbench.paths import REPO_ROOT
    from qbench.quant.support import BEGIN, END, render_readme, support_table

    readme = (REPO_ROOT / "README.md").read_text()
    assert render_readme(readme) == readme, "python -m qbench.quant.support --write-readme"
    table = support_table()
    assert BEGIN in readme and END in readme and "| OLMo2 (`olmo2`) | runs | runs | refused" in table
