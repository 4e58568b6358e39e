"""Caches that heal instead of failing cells, and malformed inputs: each its documented
exit code and one line, before any work where the README says so."""
import shutil

import pytest
import torch
from test_retrofit import _recipe, base_folder  # noqa: F401  (a fixture)

from qbench.cli import EXIT_CHECKPOINT, EXIT_STORE, EXIT_USAGE, main
from qbench.results import ResultStore

LIMIT = "3000"


def _bench(model, results, schemes="fp32", *extra):
    return main(["bench", "--model", str(model), "--schemes", schemes, "--limit", LIMIT, "--results", str(results),
                 "--quiet", *extra])


def test_a_truncated_token_cache_is_rebuilt_not_stored_as_the_cells_failure(micro_checkpoint, tmp_path,
                                                                             monkeypatch):
    """A truncated token cache made every calibrated cell a stored failure, and the cells
    stayed failed after the file was restored."""
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    assert _bench(micro_checkpoint, tmp_path / "r1", "w8a8-pt") == 0
    entries = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert entries
    for path in entries:
        path.write_bytes(path.read_bytes()[:100])
    assert _bench(micro_checkpoint, tmp_path / "r2", "w8a8-pt") == 0
    [record] = ResultStore(tmp_path / "r2").records()
    assert record["status"] == "ok"
    assert all(len(p.read_bytes()) > 100 for p in entries)  # healed in place


def test_a_bad_first_token_is_exit_2_before_any_cell(micro_checkpoint, tmp_path, capsys):
    """It was stored as a failed record per cell."""
    assert _bench(micro_checkpoint, tmp_path / "r", "fp32,w8a8-dyn", "--first-token", "<no-such-token>") == EXIT_USAGE
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qbench")]
    assert len(err) == 1 and "--first-token" in err[0] and "not a token" in err[0], err
    assert ResultStore(tmp_path / "r").records() == []


def test_a_model_folder_deleted_mid_sweep_is_exit_3_with_the_summary(micro_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    """It exited 2 ("unknown model") with no summary; README: a checkpoint changed after
    planning is 3."""
    import qbench.sweep as sweep

    keep, gone = tmp_path / "keep", tmp_path / "gone"
    shutil.copytree(micro_checkpoint, keep)
    shutil.copytree(micro_checkpoint, gone)
    suite = tmp_path / "s.yaml"
    suite.write_text(f"models: [{gone}, {keep}]\nschemes: [fp32]\nlimit: {LIMIT}\n")
    real = sweep.plan_suite

    def plan_then_delete(s):
        planned = real(s)
        shutil.rmtree(gone)
        return planned

    monkeypatch.setattr(sweep, "plan_suite", plan_then_delete)
    assert main(["sweep", str(suite), "--results", str(tmp_path / "r"), "--quiet"]) == EXIT_CHECKPOINT
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qbench sweep: error")]
    assert len(err) == 1 and "gone since its cells were planned" in err[0] and "'computed': 1" in err[0], err
    assert [r["model"].rsplit("/", 1)[-1] for r in ResultStore(tmp_path / "r").records()] == ["keep"]  # it ran


def test_a_full_disk_is_found_before_the_first_cell(micro_checkpoint, tmp_path, capsys, monkeypatch):
    """bench computed ~30 s before exit 5; README: checked before the first cell."""
    import os

    import qbench.results

    real = os.statvfs

    def full(path):
        info = real(path)
        return os.statvfs_result((info.f_bsize, info.f_frsize, info.f_blocks, 0, 0) + tuple(info)[5:])

    monkeypatch.setattr(qbench.results.os, "statvfs", full)
    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path / "cache"))
    assert _bench(micro_checkpoint, tmp_path / "r") == EXIT_STORE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk is full" in err, err
    assert not (tmp_path / "cache" / "tokens").exists() and ResultStore(tmp_path / "r").records() == []


def test_lm_eval_with_an_unknown_model_is_one_line_exit_2(monkeypatch, capsys):
    """`lm_eval --model qbench --model_args model=does-not-exist` printed a traceback."""
    import sys

    from qbench.integrations.lm_eval import QBenchLM
    from qbench.zoo import UnknownModelError

    with pytest.raises(UnknownModelError):  # from Python: the error itself
        QBenchLM(model="does-not-exist")
    monkeypatch.setattr(sys, "argv", [str(__import__("pathlib").Path("site", "lm_eval", "__main__.py"))])
    with pytest.raises(SystemExit) as exit_:
        QBenchLM(model="does-not-exist")
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == EXIT_USAGE and len(err.splitlines()) == 1 and "unknown model" in err, err


def test_deltas_holding_a_base_tensor_trainable_does_not_list_are_refused(base_folder, small_corpus,  # noqa: F811
                                                                          tmp_path, capsys):
    """Such deltas were applied (ppl 94 instead of 21): the base's tensor silently replaced."""
    from safetensors.torch import load_file, save_file

    from qbench.retrofit import DELTAS_FILE, retrofit

    out = tmp_path / "rf"
    retrofit(str(base_folder), "vga", _recipe(small_corpus, steps=1), seed=0, out=out, progress=False)
    deltas = load_file(str(out / DELTAS_FILE))
    deltas["model.norm.weight"] = torch.full((64,), 3.0)
    save_file(deltas, str(out / DELTAS_FILE))
    assert _bench(out, tmp_path / "r") == EXIT_CHECKPOINT
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qbench")]
    assert len(err) == 1 and "does not list (e.g. model.norm.weight)" in err[0], err
