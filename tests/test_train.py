import csv
import pytest
import torch
from safetensors.torch import load_file

from qbench.train import get_preset, learning_rate, train


def test_smoke_training_loss_falls_and_writes_checkpoint(micro_checkpoint):
    rows = list(csv.DictReader(open(micro_checkpoint / "train_log.csv")))
    assert len(rows) == 40
    first = sum(float(r["train_loss"]) for r in rows[:5]) / 5
    last = sum(float(r["train_loss"]) for r in rows[-5:]) / 5
    assert last < first - 0.5  # from ~ln(320)=5.8 the unigram alone is worth more than this
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (micro_checkpoint / name).exists(), name
    assert not (micro_checkpoint / "train_state.pt").exists()
    card = (micro_checkpoint / "README.md").read_text()
    assert "`vga`" in card and "final validation perplexity" in card


def test_training_is_deterministic_and_resumes_exactly(tmp_path, small_corpus, micro_preset, micro_checkpoint):
    """A run killed right after its step-20 state was saved, then rerun, ends bit-for-bit
    (to float tolerance) where an uninterrupted run ends."""
    partial = tmp_path / "resumed"
    crash = {"step": 0}

    import qbench.train as train_module

    original = train_module._atomic_torch_save

    def save_then_crash(obj, path):
        original(obj, path)
        if obj["step"] == 20:
            crash["step"] = 20
            raise KeyboardInterrupt

    train_module._atomic_torch_save = save_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train("vga", micro_preset, seed=0, out=partial, corpus=str(small_corpus), progress=False)
    finally:
        train_module._atomic_torch_save = original
    assert crash["step"] == 20 and (partial / "train_state.pt").exists()
    train("vga", micro_preset, seed=0, out=partial, corpus=str(small_corpus), progress=False)
    resumed = load_file(partial / "model.safetensors")
    uninterrupted = load_file(micro_checkpoint / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    assert len(list(csv.DictReader(open(partial / "train_log.csv")))) == 40


def test_learning_rate_warms_up_then_decays_to_ten_percent():
    preset = get_preset("tiny")
    assert learning_rate(0, preset) == pytest.approx(preset.lr / preset.warmup)
    assert learning_rate(preset.warmup, preset) == pytest.approx(preset.lr)
    assert learning_rate(preset.steps, preset) == pytest.approx(0.1 * preset.lr)


def test_unknown_preset_and_arm_suggest_names(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        get_preset("tiyn")
    with pytest.raises(ValueError, match="did you mean 'vga'"):
        train("vgaa", "tiny", 0, tmp_path)
