"""Every bad input a user can give, through the `qbench` command: a specific message, a
documented exit code (qbench/cli.py), and nothing already recorded lost."""
import errno
import json
import shutil

import pytest

from qbench.cli import EXIT_CHECKPOINT, EXIT_DATA, EXIT_STORE, EXIT_USAGE, main
from qbench.results import ResultStore

LIMIT = "3000"


def bench(checkpoint, results, schemes="fp32", tasks="ppl", extra=()):
    return main(["bench", "--model", str(checkpoint), "--schemes", schemes, "--tasks", tasks, "--limit", LIMIT,
                 "--results", str(results), "--quiet", *extra])


@pytest.fixture
def recorded(micro_checkpoint, tmp_path):
    """A results folder that already holds two records, and their bytes."""
    results = tmp_path / "results"
    assert bench(micro_checkpoint, results, "fp32,w8a8-dyn") == 0
    return results, {p.name: p.read_bytes() for p in (results / "records").glob("*.json")}


def unchanged(results, before):
    return {p.name: p.read_bytes() for p in (results / "records").glob("*.json")} == before


def test_broken_checkpoints(micro_checkpoint, tmp_path, recorded, capsys):
    results, before = recorded
    cases = {"model.safetensors is missing": lambda d: (d / "model.safetensors").unlink(),
             "model.safetensors is truncated|model.safetensors is corrupt": lambda d: (d / "model.safetensors").write_bytes(
                 (d / "model.safetensors").read_bytes()[:1000]),
             "model.safetensors is corrupt|not a safetensors": lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 4096),
             "do not match": lambda d: (d / "config.json").write_text(json.dumps(
                 {**json.loads((d / "config.json").read_text()), "d_ff": 96}))}
    for i, (message, breaker) in enumerate(cases.items()):
        broken = tmp_path / f"broken{i}"
        shutil.copytree(micro_checkpoint, broken)
        breaker(broken)
        assert bench(broken, results) == EXIT_CHECKPOINT, message
        err = capsys.readouterr().err
        assert any(m in err for m in message.split("|")), err
    assert unchanged(results, before)


def test_unknown_names(micro_checkpoint, recorded, capsys, tmp_path):
    results, before = recorded
    assert bench("tiny-vgaa", results) == EXIT_USAGE
    assert "did you mean 'tiny-vga'" in capsys.readouterr().err
    assert bench(micro_checkpoint, results, schemes="w8a8-dynn") == EXIT_USAGE
    assert "did you mean 'w8a8-dyn'" in capsys.readouterr().err
    assert bench(micro_checkpoint, results, tasks="pll") == EXIT_USAGE
    assert "did you mean 'ppl'" in capsys.readouterr().err
    suite = tmp_path / "s.yaml"
    suite.write_text(f"models: [{micro_checkpoint}]\nschemes: [fp32]\n")
    assert main(["sweep", str(suite), "--executor", "rey", "--results", str(results)]) == EXIT_USAGE
    assert "did you mean 'ray'" in capsys.readouterr().err
    suite.write_text(f"models: [{micro_checkpoint}]\nschemes: [fp32]\ntaks: [ppl]\n")
    assert main(["sweep", str(suite), "--results", str(results)]) == EXIT_USAGE
    assert "unknown key 'taks'; did you mean 'tasks'" in capsys.readouterr().err
    assert unchanged(results, before)


def test_bad_corpora(micro_checkpoint, recorded, tmp_path, capsys):
    results, before = recorded
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1") * 100)
    for path, message in ((empty, "empty"), (latin, "not UTF-8")):
        assert bench(micro_checkpoint, results, extra=("--corpus", str(path))) == EXIT_DATA
        assert message in capsys.readouterr().err
        assert main(["train", "--attention", "vga", "--preset", "bb", "--out", str(tmp_path / "m"),
                     "--corpus", str(path), "--steps", "1"]) == EXIT_DATA
        assert message in capsys.readouterr().err
    assert unchanged(results, before)


def test_results_folder_that_cannot_be_written(micro_checkpoint, recorded, tmp_path, monkeypatch, capsys):
    results, before = recorded
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert bench(micro_checkpoint, not_a_folder / "results") == EXIT_STORE
    assert "cannot create" in capsys.readouterr().err  # found before any cell runs

    import qbench.results

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qbench.results.os, "fsync", disk_full)
    assert bench(micro_checkpoint, results, schemes="fp32,w8a8-dyn,w6a6") == EXIT_STORE
    assert "No space left on device" in capsys.readouterr().err
    assert unchanged(results, before)  # the two records survive; nothing half-written lingers
    assert not list((results / "records").glob(".*.tmp"))


def test_corrupt_record_is_recomputed_not_trusted(micro_checkpoint, recorded):
    results, before = recorded
    victim = sorted((results / "records").glob("*.json"))[0]
    victim.write_text('{"key": "truncated')
    assert ResultStore(results).corrupt() == [victim]
    assert bench(micro_checkpoint, results, "fp32,w8a8-dyn") == 0
    assert ResultStore(results).corrupt() == []
    assert json.loads(victim.read_text())["metrics"] == json.loads(before[victim.name])["metrics"]


def test_nan_producing_quantization_is_a_failed_cell(micro_checkpoint, recorded, monkeypatch, capsys):
    results, before = recorded
    import qbench.runner

    real = qbench.runner.quantize

    def poison(model, scheme, calibration):
        facts = real(model, scheme, calibration)
        with __import__("torch").no_grad():
            model.lm_head.weight.fill_(float("nan"))
        return facts

    monkeypatch.setattr(qbench.runner, "quantize", poison)
    assert bench(micro_checkpoint, results, "w6a6") == 1
    assert "non-finite logits" in capsys.readouterr().err
    failed = [r for r in ResultStore(results).records() if r["status"] == "failed"]
    assert len(failed) == 1 and "NonFiniteError" in failed[0]["error"]


def test_same_cell_twice_gives_the_same_record(micro_checkpoint, tmp_path):
    """Determinism: every metric equal, bit for bit (same seeds, same thread count)."""
    results = tmp_path / "results"
    assert bench(micro_checkpoint, results, "w8a8-pt", "ppl,probes") == 0
    first = {r["key"]: r["metrics"] for r in ResultStore(results).records()}
    assert bench(micro_checkpoint, results, "w8a8-pt", "ppl,probes", extra=("--force",)) == 0
    second = {r["key"]: r["metrics"] for r in ResultStore(results).records()}
    assert first == second and len(first) == 2
