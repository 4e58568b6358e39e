"""Training state written as one atomic unit (a kill between two
renames can no longer leave a mixed state), resume refuses a partial one in one line, and
one writer per --out (train and retrofit)."""
import json
import os

import pytest
import torch
from test_retrofit import _recipe, base_folder  # noqa: F401  (a fixture)

from qbench.atomic import WRITER_LOCK, FileLock
from qbench.cli import EXIT_CHECKPOINT, EXIT_STORE, main


@pytest.mark.parametrize("kill_at", [1, 3])
def test_a_kill_right_after_any_state_rename_resumes_to_the_same_run(base_folder, small_corpus, tmp_path,  # noqa: F811
                                                                     monkeypatch, kill_at):
    """The old state was two files renamed one after the other: killed after the first
    rename, a rerun failed on every try ([Errno 2] retrofit_state.json) or resumed the
    step-2 counter with step-4 tensors (another data order, other deltas, exit 0)."""
    from safetensors.torch import load_file

    import qbench.retrofit as rf

    recipe = _recipe(small_corpus, steps=6, save_every=2)
    whole = rf.retrofit(str(base_folder), "vga", recipe, seed=0, out=tmp_path / "whole", progress=False)
    real, renames = os.replace, []

    def replace_then_die(src, dst):
        real(src, dst)
        if os.path.basename(dst).startswith("retrofit_state"):
            renames.append(dst)
            if len(renames) == kill_at:  # old code: 1 = its tensors at step 2, 3 = its tensors at step 4
                raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_die)
    cut = tmp_path / "cut"
    try:
        again = rf.retrofit(str(base_folder), "vga", recipe, seed=0, out=cut, progress=False)
    except KeyboardInterrupt:
        monkeypatch.setattr(os, "replace", real)
        again = rf.retrofit(str(base_folder), "vga", recipe, seed=0, out=cut, progress=False)
    else:  # fewer renames than kill_at (one per save): the run was never cut
        assert len(renames) < kill_at
    assert again["data_order_sha256"] == whole["data_order_sha256"]
    a, b = load_file(str(tmp_path / "whole" / rf.DELTAS_FILE)), load_file(str(cut / rf.DELTAS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("half", ["tensors only", "json only"])
def test_a_partial_old_style_state_is_refused_in_one_line(base_folder, small_corpus, tmp_path, capsys,  # noqa: F811
                                                          half):
    from safetensors.torch import save_file

    from qbench.retrofit import STATE_FILE, STATE_META

    out = tmp_path / "half"
    out.mkdir()
    if half == "tensors only":
        save_file({"x": torch.zeros(1)}, str(out / STATE_FILE))
    else:
        (out / STATE_META).write_text(json.dumps({"step": 2}))
    args = ["retrofit", "--model", str(base_folder), "--arm", "vga", "--out", str(out), "--quiet",
            "--set", f"corpus={small_corpus}", "--set", "steps=4", "--set", "batch_size=2", "--set", "context=32"]
    assert main(args) == EXIT_CHECKPOINT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "partial retrofit state" in err, err


@pytest.mark.parametrize("command", ["train", "retrofit"])
def test_a_second_writer_of_one_out_folder_stops_at_once(base_folder, small_corpus, tmp_path, capsys,  # noqa: F811
                                                         command):
    """Two `qbench retrofit` runs into one --out both said "saved"; one result was lost."""
    out = tmp_path / "out"
    holder = FileLock(out / WRITER_LOCK)
    assert holder.acquire(blocking=False)  # another writer, as a second process would hold it
    try:
        if command == "train":
            args = ["train", "--attention", "vga", "--preset", "tiny", "--steps", "2", "--corpus", str(small_corpus)]
        else:
            args = ["retrofit", "--model", str(base_folder), "--arm", "vga", "--set", f"corpus={small_corpus}",
                    "--set", "steps=2", "--set", "batch_size=2", "--set", "context=32"]
        assert main([*args, "--out", str(out), "--quiet"]) == EXIT_STORE
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"being written by another qbench {command}" in err, err
    assert sorted(p.name for p in out.iterdir()) == [WRITER_LOCK]  # nothing else written
