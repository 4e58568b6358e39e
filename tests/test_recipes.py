"""Recipes as data: built-in presets with their values, YAML recipe files, --set overrides,
schedules and clipping switches, the resolved recipe saved with the checkpoint, and resuming
with another recipe refused."""
import json

import pytest

from qbench.cli import EXIT_USAGE, main
from qbench.train import PRESETS, get_preset, parse_settings
from qbench.train.recipes import learning_rate, normalise_recipe, with_settings


def test_guo_presets_carry_the_published_recipe():
    for name in ("bb-guo", "bb3-guo", "bb-guo-cpu", "bb3-guo-cpu"):
        preset = PRESETS[name]
        assert preset.task == "bigram_backcopy" and preset.lr == 3e-4 and preset.schedule == "constant"
        assert preset.warmup == 0 and preset.grad_clip is None and preset.betas == (0.9, 0.99)
        assert preset.weight_decay == 1e-4 and preset.n_head == 1 and preset.d_model == 256
    assert PRESETS["bb-guo"].batch_size == 512 and PRESETS["bb-guo"].steps == 10000 and PRESETS["bb-guo"].n_layer == 1
    assert PRESETS["bb3-guo"].n_layer == 3 and PRESETS["bb3-guo-cpu"].n_layer == 3


def test_constant_schedule_and_settings():
    preset = with_settings(PRESETS["tiny"], {"schedule": "constant", "warmup": "0", "grad_clip": "none",
                                              "betas": "0.9,0.99", "steps": "50", "lr": "2e-4"})
    assert [learning_rate(s, preset) for s in (0, 10, 49)] == [2e-4] * 3
    assert preset.grad_clip is None and preset.betas == (0.9, 0.99) and preset.steps == 50
    cosine = PRESETS["tiny"]
    assert learning_rate(999, cosine) < 0.11 * cosine.lr and learning_rate(99, cosine) == pytest.approx(cosine.lr)
    with pytest.raises(ValueError, match="unknown recipe key 'layers'"):
        with_settings(cosine, {"layers": 3})
    with pytest.raises(ValueError, match="schedule must be one of"):
        with_settings(cosine, {"schedule": "linear"})
    recipe, arm = parse_settings(["n_layer=2", "gate_init=0.3", "corpus=sotu"])
    assert recipe == {"n_layer": "2"} and arm == {"gate_init": 0.3, "corpus": "sotu"}


def test_legacy_recipes_resume():
    """A train state written before `schedule` existed matches today's same recipe."""
    from dataclasses import asdict

    today = {"attention": "vga", "preset": PRESETS["tiny"].to_dict(), "seed": 0, "corpus": "sotu"}
    legacy_preset = {k: v for k, v in asdict(PRESETS["tiny"]).items() if k != "schedule"}
    legacy = {"attention": "vga", "preset": {**legacy_preset, "betas": list(legacy_preset["betas"])}, "seed": 0,
              "corpus": "sotu"}
    assert normalise_recipe(legacy) == normalise_recipe(today)


def test_yaml_recipe_file(tmp_path, small_corpus):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: bb-guo-cpu\nsteps: 3\nbatch_size: 4\nn_layer: 2\ncontext: 32\n")
    preset = get_preset(str(recipe))
    assert (preset.name, preset.n_layer, preset.steps, preset.schedule) == ("mine", 2, 3, "constant")
    out = tmp_path / "run"
    assert main(["train", "--attention", "vga_x", "--preset", str(recipe), "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    saved = config["qbench_training"]["recipe"]
    assert saved["n_layer"] == 2 and saved["schedule"] == "constant" and saved["grad_clip"] is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nlayers: 3\n")
    assert main(["train", "--attention", "vga", "--preset", str(bad), "--out", str(tmp_path / "x")]) == EXIT_USAGE


def test_bb3_guo_cpu_with_set_steps(tmp_path):
    """The issue's command, at batch 8 instead of the preset's 128 (the preset's 3 layers, its
    validation and the card are what the command checks; the batch only sets the time)."""
    out = tmp_path / "bb3"
    assert main(["train", "--preset", "bb3-guo-cpu", "--attention", "softmax", "--set", "steps=20", "--set",
                 "batch_size=8", "--out", str(out), "--quiet"]) == 0
    assert "bb3-guo-cpu" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["qbench_training"]["recipe"]["steps"] == 20 and config["n_layer"] == 3


def test_resuming_with_another_recipe_names_what_differs(tmp_path, capsys, monkeypatch):
    import qbench.train.loop as train_module

    out = tmp_path / "run"
    args = ["train", "--preset", "bb-guo-cpu", "--attention", "vga", "--set", "steps=6", "--set", "batch_size=4",
            "--set", "save_every=3", "--out", str(out), "--quiet"]
    original = train_module.atomic_torch_save

    def save_then_stop(obj, path):
        original(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "atomic_torch_save", save_then_stop)
    assert main(args) == 130 and (out / "train_state.pt").exists()
    monkeypatch.setattr(train_module, "atomic_torch_save", original)
    capsys.readouterr()
    assert main(args[:-3] + ["--set", "lr=1e-3", "--out", str(out), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another recipe" in err and "lr" in err
    assert main(args) == 0 and (out / "model.safetensors").exists()  # the same recipe resumes


def test_list_presets_shows_the_values(capsys):
    assert main(["list", "presets"]) == 0
    out = capsys.readouterr().out
    for name in ("bb-guo", "bb3-guo", "bb-guo-cpu", "bb3-guo-cpu"):
        assert name in out
    assert "schedule=constant" in out and "batch_size=512" in out


def test_bb_protocol_reports_the_copy_circuit_and_per_layer_mechanism(tmp_path):
    """A 2-layer bb model: its perplexity record splits copy and bigram positions, and
    carries Attn_s / Val_s / Delta-logit_s and the residual peak for every layer, on the
    quantized model too; the training log has per-layer columns."""
    import csv

    from qbench.runner import run_bench
    from qbench.results import ResultStore

    out = tmp_path / "bb2"
    assert main(["train", "--preset", "bb-guo-cpu", "--attention", "vga", "--set", "steps=10", "--set", "batch_size=8",
                 "--set", "n_layer=2", "--set", "lr=3e-3", "--out", str(out), "--quiet"]) == 0
    header = next(csv.reader(open(out / "mechanism_log.csv")))
    assert "attn_s_l0" in header and "attn_s_l1" in header and header[1] == "attn_s"
    records = run_bench([str(out)], ["fp32", "w8a8-pt", "w8a8-attn"], ["ppl"], ResultStore(tmp_path / "r"),
                        progress=False)
    for record in records:
        m = record["metrics"]
        assert record["status"] == "ok", record.get("error")
        assert m["copy_positions"] > 0 and m["bigram_positions"] > m["copy_positions"]
        total = m["copy_loss"] * m["copy_positions"] + m["bigram_loss"] * m["bigram_positions"]
        assert total == pytest.approx(m["nll_sum"], rel=1e-5)  # the split adds up to the whole
        assert len(m["mechanism_per_layer"]) == 2 and len(m["residual_peak_per_layer"]) == 2
        assert 0 <= m["mechanism"]["attn_s"] <= 1
    kernel = records[2]["metrics"]["mechanism_per_layer"][0]
    assert kernel["delta_logit_s"] != kernel["delta_logit_s"]  # NaN: the kernel exposes no scores
