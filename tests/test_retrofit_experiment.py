"""Issue 32's retrofit experiment: the control trains what the arm trains apart from the arm,
the clamp of H2 is in force wherever the model is loaded (quantized too), CPU bf16 autocast
is recorded (and refused where the CPU has no bf16 units), the dose snapshots, and the
section's verdicts under the pre-registered rule with its margin."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_retrofit import _ids, _llama, base_folder  # noqa: F401  (the module-scoped fixture)

from qbench.modeling.llama_arms import RETROFIT_ARMS, arm_parameter_names, install_arm


@pytest.mark.parametrize("recipe", ["retrofit-cpu-h1", "retrofit-cpu-h2", "retrofit-gpu"])
@pytest.mark.parametrize("arm", [a for a in RETROFIT_ARMS if a != "softmax"])
def test_the_control_trains_the_same_base_parameters_as_each_arm(recipe, arm):
    from qbench.retrofit import get_recipe
    from qbench.retrofit.recipes import trainable_names

    spec = get_recipe(recipe).trainable
    control, gated = _twelve_layers(), _twelve_layers()  # retrofit-gpu trains layers 8-11
    install_arm(control, "softmax")
    install_arm(gated, arm)
    control_names = trainable_names(control, spec)
    arm_names = trainable_names(gated, spec)
    own = set(arm_parameter_names(gated))
    assert control_names, "the control must train something"
    assert own and own <= set(arm_names)
    assert sorted(set(arm_names) - own) == control_names


def _twelve_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def _mlp_outputs(model, layer: int, ids) -> torch.Tensor:
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen[0]


def test_auto_cap_is_the_largest_value_at_the_other_positions_and_the_clamp_caps_only_the_first():
    from qbench.retrofit.clamp import auto_cap, clamp_in_force, install_clamp

    model, ids = _llama(), _ids()
    raw = _mlp_outputs(model, 1, ids)
    cap = auto_cap(model, 1, ids)
    assert cap == raw[:, 1:].abs().max().item()
    small = raw[:, 0].abs().max().item() / 2  # a cap that binds at the first position
    install_clamp(model, 1, small)
    assert clamp_in_force(model) == {"layer": 1, "cap": small}
    out = _mlp_outputs(model, 1, ids)
    assert out[:, 0].abs().max().item() == pytest.approx(small, rel=0, abs=0)
    assert torch.equal(out[:, 0], raw[:, 0].clamp(-small, small))
    assert torch.equal(out[:, 1:], raw[:, 1:])
    with pytest.raises(ValueError, match="layers"):
        install_clamp(model, 7, 1.0)


def _recipe(small_corpus, name="retrofit-cpu-h2", **changes):
    from qbench.retrofit import get_recipe

    settings = {"steps": 6, "batch_size": 2, "context": 32, "save_every": 3, "log_every": 2, "warmup": 1,
                "corpus": str(small_corpus), "clamp_layer": 1, "snapshots": "0", **changes}
    return get_recipe(name, settings)


def test_the_clamp_is_recorded_applied_on_load_and_kept_by_a_quantizer(base_folder, small_corpus, tmp_path):  # noqa: F811
    from qbench.quant import quantize
    from qbench.retrofit import CONFIG_FILE, load_retrofit, retrofit
    from qbench.retrofit.clamp import clamp_in_force

    auto = retrofit(str(base_folder), "vga", _recipe(small_corpus, steps=1, snapshots=""), seed=0,
                    out=tmp_path / "auto", progress=False)["clamp"]
    assert auto["layer"] == 1 and auto["cap"] > 0 and "non-first" in auto["chosen_by"]
    ids = _ids()
    unclamped = _mlp_outputs(_llama(), 1, ids)[:, 0].abs().max().item()
    out = tmp_path / "rf-h2"  # a cap that binds on these windows, so that the checks below can fail
    facts = retrofit(str(base_folder), "vga", _recipe(small_corpus, clamp_cap=unclamped / 4), seed=0, out=out,
                     progress=False)
    clamp = facts["clamp"]
    assert clamp == {"layer": 1, "site": "MLP output (down projection), first position", "cap": unclamped / 4,
                     "chosen_by": "recipe"}
    assert json.loads((out / CONFIG_FILE).read_text())["clamp"] == clamp
    loaded = load_retrofit(out).model
    assert clamp_in_force(loaded) == {"layer": 1, "cap": clamp["cap"]}
    assert _mlp_outputs(loaded, 1, ids)[:, 0].abs().max().item() <= clamp["cap"]
    mlp = loaded.model.layers[1].mlp  # a library that swaps the down projection for its own module:
    old = mlp.down_proj
    mlp.down_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    mlp.down_proj.load_state_dict(old.state_dict())
    assert _mlp_outputs(loaded, 1, ids)[:, 0].abs().max().item() <= clamp["cap"]
    quantize(loaded, "w8a8-dyn")  # swaps the MLP's linears for quantized ones: the clamp stays
    assert type(loaded.model.layers[1].mlp.down_proj) is not torch.nn.Linear
    assert _mlp_outputs(loaded, 1, ids)[:, 0].abs().max().item() <= clamp["cap"]
    # a retrofit.json whose clamp is malformed is refused in one line
    bad = json.loads((out / CONFIG_FILE).read_text())
    bad["clamp"] = {"layer": 1, "cap": -1}
    (out / CONFIG_FILE).write_text(json.dumps(bad))
    from qbench.zoo import CheckpointError

    with pytest.raises(CheckpointError, match="cap > 0"):
        load_retrofit(out)


def test_snapshots_are_loadable_copies_at_their_token_counts(base_folder, small_corpus, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from qbench.retrofit import CONFIG_FILE, DELTAS_FILE, retrofit

    out = tmp_path / "rf-h1"
    recipe = _recipe(small_corpus, "retrofit-cpu-h1", clamp_layer=-1, batch_size=4, context=64, snapshots="0,1024")
    retrofit(str(base_folder), "softmax", recipe, seed=0, out=out, progress=False)
    zero, four = tmp_path / "rf-h1-t0k", tmp_path / "rf-h1-t1k"  # 1,024 tokens = step 4 of 4 x 64
    assert json.loads((zero / CONFIG_FILE).read_text())["steps_done"] == 0
    snap = json.loads((four / CONFIG_FILE).read_text())
    assert snap["steps_done"] == 4 and snap["tokens_done"] == 1024 and snap["snapshot_of"] == "rf-h1"
    with pytest.raises(ValueError, match="one name"):  # 0 and 256 tokens would both be -t0k
        _recipe(small_corpus, "retrofit-cpu-h1", batch_size=4, context=64, snapshots="0,256")
    base = dict(_llama().named_parameters())
    first = load_file(str(zero / DELTAS_FILE))
    assert first and all(torch.equal(t, base[n].detach()) for n, t in first.items())  # step 0: nothing trained
    final = load_file(str(out / DELTAS_FILE))
    assert any(not torch.equal(final[n], first[n]) for n in first)  # the control's norms trained


def test_cpu_bf16_autocast_is_recorded_or_refused_where_the_cpu_has_no_bf16_units(monkeypatch, base_folder,  # noqa: F811
                                                                                  small_corpus, tmp_path):
    from qbench.quant import int8_gemm
    from qbench.retrofit import retrofit

    real = int8_gemm.cpu_signature()
    monkeypatch.setattr(int8_gemm, "cpu_signature", lambda: {**real, "flags": ["avx2", "avx512f"]})
    with pytest.raises(ValueError, match="bfloat16 units"):
        retrofit(str(base_folder), "vga", _recipe(small_corpus, steps=1, snapshots=""), seed=0,
                 out=tmp_path / "none", amp="bf16", progress=False)
    monkeypatch.setattr(int8_gemm, "cpu_signature", lambda: {**real, "flags": ["amx_bf16", "avx512_bf16"]})
    facts = retrofit(str(base_folder), "vga", _recipe(small_corpus, steps=2, snapshots=""), seed=0,
                     out=tmp_path / "bf16", amp="bf16", progress=False)
    assert facts["amp"] == "bf16"
    assert facts["autocast"] == {"dtype": "bfloat16 autocast", "master_weights": "float32", "device_type": "cpu",
                                 "cpu_bf16_units": "amx_bf16+avx512_bf16"}


# -- the section and its verdicts ---------------------------------------------------------

def _ppl(model, scheme, value):
    from qbench.study.retrofit_experiment import PROTOCOL

    return {"model": model, "scheme": scheme, "task": "ppl", "status": "ok", "protocol": PROTOCOL,
            "calibration_seed": 0 if scheme != "fp32" else None, "metrics": {"ppl": value}}


def _records(control_pt, vga_pt, fp32=20.0):
    records = [_ppl("smollm2-135m", "fp32", 20.0), _ppl("smollm2-135m", "w8a8-pt", 80.0)]
    for arm, values in (("softmax", control_pt), ("vga", vga_pt)):
        for seed, value in enumerate(values):
            records += [_ppl(f"smollm2-rf-h1-{arm}-s{seed}", "fp32", fp32),
                        _ppl(f"smollm2-rf-h1-{arm}-s{seed}", "w8a8-pt", value)]
    return records


def test_endpoints_are_computed_against_the_original_and_the_own_fp32():
    from qbench.study.retrofit_experiment import endpoint_values, parse

    assert parse("smollm2-rf-h2-vga_out-s1-t25k") == {"hyp": "h2", "arm": "vga_out", "seed": 1, "tokens": 25000,
                                                       "rerun": False}
    assert parse("smollm2-rf-h1-vga-s0-rerun-t25k")["rerun"] and parse("smollm2-rf-h1-vga-s0-rerun")["tokens"] is None
    assert parse("smollm2-rf-pilot-vga-s0") is None
    values = endpoint_values(_records([30.0], [25.0], fp32=25.0))
    row = values["smollm2-rf-h1-vga-s0"]
    assert row["e_orig"] == pytest.approx(25.0)  # 25 / 20 - 1
    assert row["e_own"] == pytest.approx(0.0) and row["dnll"] == pytest.approx(0.0)
    assert values["smollm2-rf-h1-softmax-s0"]["dnll"] == pytest.approx(math.log(30 / 25))


def test_a_separated_difference_within_the_control_spread_is_not_shown():
    from qbench.study.retrofit_experiment import experiment_section, judge, endpoint_values

    # 4 vs 4, every vga seed below every control seed: p = 1/70
    separated = endpoint_values(_records([30.0, 30.2, 30.4, 30.6], [29.0, 29.1, 29.2, 29.3]))
    evidence, found = judge(separated, "h1", "vga", "e_orig")
    assert evidence.sensitivity == pytest.approx(100 * 0.6 / 20)  # the control's spread, in E_orig units
    assert found.label == "supported" and found.p_predicted == pytest.approx(1 / 70)
    # the same ordering, but the difference (0.25 ppl) is inside the control's spread (4 ppl)
    close = endpoint_values(_records([28.0, 28.5, 29.0, 32.0], [28.2, 28.3, 28.4, 28.6]))
    assert judge(close, "h1", "vga", "e_orig")[1].label == "not shown"
    # two seeds a side: insufficient, whatever the values
    assert judge(endpoint_values(_records([30.0, 31.0], [20.0, 21.0])), "h1", "vga", "e_orig")[1].label == "insufficient"
    text = experiment_section(_records([30.0, 30.2, 30.4, 30.6], [29.0, 29.1, 29.2, 29.3]))
    assert "Written before the runs" in text and "| H1: E_orig" in text and "supported (p 0.014" in text


def test_the_section_reports_the_unrepaired_clamp_and_where_the_largest_activation_moved():
    from qbench.study.retrofit_experiment import experiment_section

    records = _records([30.0], [29.0]) + [_ppl("smollm2-rf-h2-softmax-s0-t0k", "fp32", 1000.0),
                                          _ppl("smollm2-rf-h2-softmax-s0", "fp32", 40.0)]
    for model, position in (("smollm2-135m", 0), ("smollm2-rf-h2-softmax-s0", 1), ("smollm2-rf-h1-vga-s0", 0)):
        records.append({"model": model, "scheme": "fp32", "task": "probes", "status": "ok",
                        "metrics": {"massive_activation_max": 100.0, "max_activation_position": position}})
    text = experiment_section(records)
    assert "from 20.00 to 1,000 (0 tokens)" in text
    assert "- H2: in 1 of 1 fine-tuned models the largest activation is no longer on the first token" in text
    assert "- H1: in 0 of 1 fine-tuned models" in text


def test_seeds_added_after_the_first_results_are_declared_and_the_preregistered_verdict_shown_beside():
    """H2c's one-sample test cannot reach p < 0.05 with 4 seeds (min p 1/16); a fifth seed can
    (1/32).  The section says the seed was added after the results and gives the verdict on the
    pre-registered seeds 0-3 beside the one on every seed."""
    from qbench.study.retrofit_experiment import experiment_section, judge_against_original, endpoint_values

    records = [_ppl("smollm2-135m", "fp32", 20.0), _ppl("smollm2-135m", "w8a8-pt", 80.0)]  # E_own +300%
    for arm, pts in (("softmax", [70.0, 71.0, 72.0, 73.0, 74.0]), ("vga", [40.0, 41.0, 42.0, 43.0, 44.0])):
        for seed, pt in enumerate(pts):
            records += [_ppl(f"smollm2-rf-h2-{arm}-s{seed}", "fp32", 20.0),
                        _ppl(f"smollm2-rf-h2-{arm}-s{seed}", "w8a8-pt", pt)]
    values = endpoint_values(records)
    five = judge_against_original(values, "h2", "vga", "e_own")[1]
    four = judge_against_original(values, "h2", "vga", "e_own", seeds=range(4))[1]
    assert five.label == "supported" and five.p_predicted == pytest.approx(1 / 32)
    assert four.label != "supported" and four.p_predicted == pytest.approx(1 / 16)
    text = experiment_section(records)
    assert "Added after the first results (not pre-registered)" in text
    assert "| H2c: E_own vs the original's E_own (%) | vga | 5 / - |" in text
    assert "| H2c: E_own vs the original's E_own (%), seeds 0-3 | vga | 4 / - |" in text
    # without a fifth seed there is nothing to declare
    assert "Added after" not in experiment_section([r for r in records if not r["model"].endswith("-s4")])


def test_a_rerun_gives_its_dose_rows_apart_and_no_verdict_counts_it():
    """The `-rerun` models (a seed rerun whose final differs from the kept run's) show their
    snapshots and final as (rerun) rows; the verdicts and the seed counts use the runs only."""
    from qbench.study.retrofit_experiment import endpoint_values, experiment_section, judge

    records = _records([30.0, 30.2, 30.4, 30.6], [29.0, 29.1, 29.2, 29.3])
    records += [_ppl("smollm2-rf-h1-vga-s0-rerun", "fp32", 20.0), _ppl("smollm2-rf-h1-vga-s0-rerun", "w8a8-pt", 10.0),
                _ppl("smollm2-rf-h1-vga-s0-rerun-t25k", "fp32", 21.0),
                _ppl("smollm2-rf-h1-vga-s0-rerun-t25k", "w8a8-pt", 33.0)]
    evidence, found = judge(endpoint_values(records), "h1", "vga", "e_orig")
    assert len(evidence.arm) == 4 and 10.0 / 20 * 100 - 100 not in evidence.arm  # the rerun's -50% is not a unit
    text = experiment_section(records)
    assert "**Rows marked (rerun).**" in text
    assert "| h1 | vga | 25k (rerun) | 21.000 |" in text and "| h1 | vga | 0.1M (final) (rerun) | 20.000 |" in text
    assert "| h1 | vga | 0.1M (final) | 20.000 ± 0.000 (n=4) |" in text
    assert "Rows marked" not in experiment_section(_records([30.0], [29.0]))
