import csv
import pytest
import torch
from safetensors.torch import load_file

from qbench.train import get_preset, train
from qbench.train.recipes import learning_rate


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

    import qbench.train.loop as train_module

    original = train_module.atomic_torch_save

    def save_then_crash(obj, path):
        original(obj, path)
        if obj["step"] == 20:
            crash["step"] = 20
            raise KeyboardInterrupt

    train_module.atomic_torch_save = save_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train("vga", micro_preset, seed=0, out=partial, corpus=str(small_corpus), progress=False)
    finally:
        train_module.atomic_torch_save = original
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


def test_bf16_autocast_and_bf16_storage_load_back_as_float32(tmp_path, small_corpus, micro_preset, micro_checkpoint):
    """The GPU recipe's options on the CPU: bf16 autocast trains (loss falls), the weights
    are stored bf16, the card says so, and the zoo loader returns float32 weights that are
    the stored ones exactly.  The same seed starts from the same weights as float32 runs."""
    from qbench.zoo import load_model

    out = tmp_path / "bf16"
    info = train("vga", micro_preset, seed=0, out=out, corpus=str(small_corpus), progress=False,
                 amp="bf16", save_dtype="bfloat16", device="cpu")
    assert info["amp"] == "bf16" and info["stored_dtype"] == "bfloat16" and info["device"].startswith("cpu")
    stored = load_file(out / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.5
    assert "weights stored as bfloat16" in (out / "README.md").read_text()
    model = load_model(str(out)).model
    for name, tensor in model.state_dict().items():
        if name in stored:
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, stored[name].float()), name
    # Same seed, same first step: the float32 run's first logged loss (fp32 vs bf16 autocast).
    first_fp32 = float(next(csv.DictReader(open(micro_checkpoint / "train_log.csv")))["train_loss"])
    assert float(rows[0]["train_loss"]) == pytest.approx(first_fp32, abs=0.05)


def test_bad_precision_options_and_missing_cuda_are_clear(tmp_path, small_corpus, micro_preset):
    with pytest.raises(ValueError, match="amp"):
        train("vga", micro_preset, seed=0, out=tmp_path / "a", corpus=str(small_corpus), amp="fp8")
    with pytest.raises(ValueError, match="save dtype"):
        train("vga", micro_preset, seed=0, out=tmp_path / "b", corpus=str(small_corpus), save_dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            train("vga", micro_preset, seed=0, out=tmp_path / "c", corpus=str(small_corpus), device="cuda")
