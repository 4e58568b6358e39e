"""--device plumbing, exercised on the CPU (a GPU is never needed): the device reaches the
model, quantizers, probes and FP reference, is recorded as provenance but not in the key,
and an unusable device is a one-line error (exit 2) before any work."""
import pytest
import torch

from qbench.runner import run_bench
from qbench.cli import EXIT_USAGE, main
from qbench.device import resolve_device
from qbench.results import ResultStore

LIMIT = 3000


def test_explicit_cpu_device_gives_the_same_records_and_keys(micro_checkpoint, tmp_path):
    default = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn-int8", "w8a8-pt"], ["ppl", "probes"],
                        ResultStore(tmp_path / "a"), limit=LIMIT, progress=False)
    explicit = run_bench([str(micro_checkpoint)], ["fp32", "w8a8-dyn-int8", "w8a8-pt"], ["ppl", "probes"],
                         ResultStore(tmp_path / "b"), limit=LIMIT, progress=False, device=torch.device("cpu"))
    assert [r["key"] for r in default] == [r["key"] for r in explicit]
    for a, b in zip(default, explicit):
        assert a["status"] == b["status"] == "ok"
        assert b["provenance"]["device"] == "cpu"
        for name in ("ppl", "kl", "sink_rate@0.3", "max_inf_norm"):
            if name in a["metrics"]:
                assert a["metrics"][name] == pytest.approx(b["metrics"][name], rel=1e-6)


@pytest.mark.parametrize("text,needle", [("cuda", "no CUDA device"), ("cuda:3", "no CUDA device"),
                                         ("tpu", "is not a device"), ("mps", "cpu or cuda")])
def test_unusable_device_is_one_line_exit_2(micro_checkpoint, tmp_path, capsys, text, needle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["bench", "--model", str(micro_checkpoint), "--schemes", "fp32", "--limit", str(LIMIT),
                 "--results", str(tmp_path / "r"), "--quiet", "--device", text])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "r" / "records").exists() or not list((tmp_path / "r" / "records").glob("*.json"))


def test_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="1 CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_placed_model_moves_its_inputs(micro_checkpoint):
    from qbench.device import model_device, place
    from qbench.zoo import load_model

    model = load_model(str(micro_checkpoint)).model
    place(model, torch.device("cpu"))
    place(model, torch.device("cpu"))  # idempotent: one input hook
    assert model_device(model) == torch.device("cpu") and len(model._forward_pre_hooks) == 1
    assert model(input_ids=torch.randint(3, 300, (1, 8))).logits.shape[:2] == (1, 8)


def test_gpu_check_dry_run_passes_on_the_cpu():
    import subprocess
    import sys

    from qbench.paths import REPO_ROOT

    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py"), "--dry-run",
                           "--schemes", "fp32,w8a8-dyn"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| fp32 |" in done.stdout and "| w8a8-dyn |" in done.stdout and "DIFFERS" not in done.stdout
    assert done.stdout.count("| ok |") == 2
