"""scripts/gpu_zoo.py's hand-back: finished checkpoints leave the GPU machine in priority
order, in batches within the transfer limits, and unpack into models/ without overwriting."""
import argparse
import importlib.util
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_zoo.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_zoo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_checkpoint(root: Path, name: str, payload: int) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * payload)
    (folder / "train_state.pt").write_bytes(b"never packed")
    return folder


def test_batches_respect_the_limits_and_the_priority_order(tmp_path, monkeypatch):
    gpu_zoo = load_script()
    work = tmp_path / "work"
    work.mkdir()
    names = [f"tiny-arm{i}" for i in range(9)]
    for i, name in enumerate(reversed(names)):  # packed out of order; the prefix decides
        gpu_zoo.pack(work, fake_checkpoint(tmp_path / "ckpt", name, 9_000), priority=len(names) - 1 - i)
    size = {p.stat().st_size for p in (work / "ret").glob("*.tar")}
    assert len(size) == 1
    monkeypatch.setattr(gpu_zoo, "BATCH_BYTES", 4 * size.pop() + 1)  # room for four tars a batch
    batches = []
    while list((work / "ret").glob("*.tar")):
        out = tmp_path / f"out{len(batches)}"
        gpu_zoo.cmd_fetch(argparse.Namespace(work=str(work), out=str(out)))
        tars = sorted(p for p in out.glob("*.tar"))
        assert 0 < len(tars) <= gpu_zoo.BATCH_FILES
        assert sum(p.stat().st_size for p in tars) <= gpu_zoo.BATCH_BYTES
        assert (out / "gpu_zoo.log").exists()
        batches.append([p.name for p in tars])
    flat = [name for batch in batches for name in batch]
    assert flat == [f"{i:02d}-{name}.tar" for i, name in enumerate(names)]
    assert [len(b) for b in batches] == [4, 4, 1]

    models = tmp_path / "models"
    fake_checkpoint(models, "tiny-arm0", 1)  # already in the zoo: kept as it is
    for out in sorted(tmp_path.glob("out*")):
        gpu_zoo.cmd_unpack(argparse.Namespace(folder=str(out), models=str(models)))
    assert (models / "tiny-arm0" / "model.safetensors").stat().st_size == 1
    for name in names[1:]:
        assert (models / name / "model.safetensors").stat().st_size == 9_000
        assert not (models / name / "train_state.pt").exists()


def test_a_tar_holds_one_folder_without_the_training_state(tmp_path):
    gpu_zoo = load_script()
    work = tmp_path / "work"
    work.mkdir()
    tar = gpu_zoo.pack(work, fake_checkpoint(tmp_path, "small-vga", 10), priority=1)
    with tarfile.open(tar) as t:
        assert sorted(t.getnames()) == ["small-vga", "small-vga/config.json", "small-vga/model.safetensors"]


def test_gpu_campaign_dry_run_trains_packs_and_hands_back(tmp_path):
    """`python scripts/gpu_campaign.py --dry-run` (`run` is the default command): the bb-guo and bb3-guo runs,
    2 steps each on the CPU, packed and handed back within the limits, unpackable.  Two arms run
    (the packing does not depend on the arm; every arm's training is tested in test_train/test_zoo);
    the queue itself is checked to hold every campaign arm under both presets."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_campaign.py"
    work, out = tmp_path / "work", tmp_path / "out"
    arms = ["softmax", "vga"]
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--work", str(work), "--out", str(out),
                           "--budget", "900", "--arms", ",".join(arms), "--parallel", "2"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("gpu_campaign", script)
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    assert {(p, a) for p, a, _ in campaign.queue((0,))} == {(p, a) for p in campaign.PRESETS for a in campaign.ARMS}
    expected = len([run for run in campaign.queue((0,)) if run[1] in arms])
    assert expected == 2 * len(arms)
    log = (out / "campaign.log").read_text()
    assert f"{expected} packed, 0 failed" in log
    with tarfile.open(out / campaign.CELLS_TAR) as t:  # one fp32 BB cell per checkpoint, in the first batch
        assert len([n for n in t.getnames() if n.endswith(".json")]) == expected
    tars = sorted(out.glob("*.tar"))
    assert 0 < len(tars) <= 8 and sum(t.stat().st_size for t in tars) <= 64 * 2**20
    gpu_zoo = load_script()
    models = tmp_path / "models"
    gpu_zoo.cmd_unpack(argparse.Namespace(folder=str(out), models=str(models)))
    unpacked = sorted(p.name for p in models.iterdir())
    assert unpacked and all((models / n / "model.safetensors").exists() for n in unpacked)
    assert not any((models / n / "train_state.pt").exists() for n in unpacked)
    assert {n.split("-")[0] for n in unpacked} <= {"bb", "bb3"}


def test_a_stopped_run_travels_as_safetensors_and_resumes_exactly(tmp_path, small_corpus, micro_preset):
    """The deadline path of gpu_campaign.py: a run killed after its step-4 state is packed as
    a .partial.tar holding train_state.safetensors (no pickle), restored into a fresh work
    folder, and resumed: it ends where an uninterrupted run ends."""
    from dataclasses import replace

    import pytest
    import torch
    from safetensors.torch import load_file

    import qbench.train.loop as train_module
    from qbench.train import PRESETS, train

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_campaign.py"
    spec = importlib.util.spec_from_file_location("gpu_campaign", script)
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    preset = replace(PRESETS["bb-guo"], d_model=64, d_ff=128, batch_size=4, context=16, steps=8,
                     eval_every=4, save_every=4)
    whole = tmp_path / "whole"
    train("vga", preset, seed=0, out=whole, corpus=str(small_corpus), progress=False)

    work = tmp_path / "work"
    folder = work / "ckpt" / "bb-guo-vga"
    original = train_module.atomic_torch_save

    def save_then_stop(obj, path):
        original(obj, path)
        if obj["step"] == 4:
            raise KeyboardInterrupt

    train_module.atomic_torch_save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train("vga", preset, seed=0, out=folder, corpus=str(small_corpus), progress=False)
    finally:
        train_module.atomic_torch_save = original
    tar = campaign.pack_partial(work, folder, 3)
    assert tar.name == "03-bb-guo-vga.partial.tar"
    with tarfile.open(tar) as t:
        names = sorted(t.getnames())
    assert "bb-guo-vga/train_state.safetensors" in names and not any(n.endswith(".pt") for n in names)

    fresh = tmp_path / "fresh"
    assert campaign.restore(fresh, str(tar.parent)) == ["bb-guo-vga"]
    resumed = fresh / "ckpt" / "bb-guo-vga"
    assert not (resumed / "train_state.pt").exists()
    train("vga", preset, seed=0, out=resumed, corpus=str(small_corpus), progress=False)
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    assert not (resumed / "train_state.safetensors").exists()


def test_a_foreign_safetensors_state_is_refused_with_its_name(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    from qbench.train.state import load_state
    from qbench.zoo import CheckpointError

    path = tmp_path / "train_state.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"qbench_train_state": '{"recipe": {}}'})
    with pytest.raises(CheckpointError, match="train_state.safetensors is not a qbench training state"):
        load_state(path)
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="not a qbench training state"):
        load_state(path)
