"""Concurrent runs, changed zoo weights, untrusted resume states, stopping sweeps, malformed
records and bounded inputs: each refused or survived with its documented exit code and one line."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hook_env import with_test_hooks
from qbench.cli import EXIT_CHECKPOINT, EXIT_STORE, EXIT_USAGE, main
from qbench.results import ResultStore

LIMIT = "3000"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def qbench(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "qbench.cli", *args], env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# 1. concurrent runs ----------------------------------------------------------------------

def test_two_writers_of_one_cache_file_never_collide(tmp_path):
    """The FP-reference cache's writer, run by two processes at once on the same files."""
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from qbench.eval.reference import _atomic_save
        for i in range(300):
            _atomic_save(Path({str(tmp_path)!r}) / f"{{i % 3:05d}}.npy", np.full((64, 64), i, dtype=np.float32))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=ENV, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    import numpy as np

    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.npy", "00001.npy", "00002.npy"]  # no temp left
    assert all(np.load(tmp_path / f"{i:05d}.npy").shape == (64, 64) for i in range(3))


def test_concurrent_benches_share_store_and_cache_and_compute_each_cell_once(micro_checkpoint, tmp_path):
    store_dir, cache = tmp_path / "store", tmp_path / "cache"
    args = ["bench", "--model", str(micro_checkpoint), "--schemes", "fp32,w8a8-dyn,w8a8-pt,w4-rtn-g64",
            "--limit", LIMIT, "--results", str(store_dir), "--quiet"]
    procs = [qbench(*args, env={"QBENCH_CACHE": str(cache)}) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    store = ResultStore(store_dir)
    records = store.records()
    assert len(records) == 4 and not store.corrupt() and not store.quarantined()
    finished = sorted(r["provenance"]["finished_at"] + r["key"] for r in records)
    assert len(set(finished)) == 4  # one record per cell, each written once
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert not leftovers


def test_a_killed_lock_holder_does_not_leave_the_lock_stuck(tmp_path):
    from qbench.atomic import FileLock

    path = tmp_path / "cell.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from qbench.atomic import FileLock
        FileLock({str(path)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    lock = FileLock(path)
    assert lock.acquire(blocking=False) is False
    holder.kill()
    holder.wait()
    assert lock.acquire(blocking=True, timeout=5) is True
    lock.release()


# 2. corrupt or changed zoo weights ------------------------------------------------------

def test_changed_zoo_checkpoint_is_refused_with_both_hashes(micro_checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    import qbench.zoo as zoo

    folder = tmp_path / "models" / "micro"
    shutil.copytree(micro_checkpoint, folder)
    monkeypatch.setattr(zoo, "models_dir", lambda: tmp_path / "models")
    good = zoo.resolve_model(str(folder)).checkpoint_hash
    (tmp_path / "models" / "zoo.yaml").write_text(json.dumps({"models": {"micro": {
        "path": "micro", "arm": "vga", "preset": "micro", "seed": 0, "steps": 40, "checkpoint_hash": good}}}))
    assert zoo.resolve_model("micro").checkpoint_hash == good
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])  # 4 KB flipped
    weights.write_bytes(bytes(data))
    results = tmp_path / "results"
    assert main(["bench", "--model", "micro", "--schemes", "fp32", "--limit", LIMIT, "--results", str(results),
                 "--quiet"]) == EXIT_CHECKPOINT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and good in err and "--allow-modified" in err
    assert not (results / "records").exists() or not list((results / "records").glob("*.json"))
    assert main(["bench", "--model", "micro", "--schemes", "fp32", "--limit", LIMIT, "--results", str(results),
                 "--quiet", "--allow-modified"]) in (0, 1)
    [record] = ResultStore(results).records()
    assert record["config"]["model"]["checkpoint_hash"] != good
    # that call only: the next one in this process checks the hash again
    assert main(["bench", "--model", "micro", "--schemes", "fp32", "--limit", LIMIT, "--results",
                 str(tmp_path / "results-after"), "--quiet"]) == EXIT_CHECKPOINT
    assert good in capsys.readouterr().err


# 3. resume does not unpickle untrusted data ----------------------------------------------

def test_a_malicious_train_state_does_not_run(tmp_path, small_corpus, micro_preset):
    from dataclasses import replace

    from qbench.train import train
    from qbench.zoo import CheckpointError

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"recipe": Payload()}, out / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt is not a plain training state"):
        train("softmax", replace(micro_preset, steps=2), seed=0, out=out, corpus=str(small_corpus), progress=False)
    assert not marker.exists()
    code = main(["train", "--attention", "softmax", "--preset", "tiny", "--steps", "2", "--out", str(out),
                 "--corpus", str(small_corpus), "--quiet"])
    assert code == EXIT_CHECKPOINT and not marker.exists()


# 4. sweep --workers stops -----------------------------------------------------------------

def _sweep(tmp_path, micro_checkpoint, delay="3"):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"models: [{micro_checkpoint}]\nschemes: [fp32, w8a8-dyn, w4-rtn-g64, w4-rtn-g128, w8a8-pt, "
                     f"w6a6, w4a8, nf4]\nlimit: {LIMIT}\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = qbench("sweep", str(suite), "--workers", "2", "--results", str(tmp_path / "store"), "--quiet",
                  env=with_test_hooks(ENV, QBENCH_TEST_PID_DIR=str(pids), QBENCH_TEST_CELL_DELAY=delay,
                                      QBENCH_CACHE=str(tmp_path / "cache")), start_new_session=True)
    def workers():  # from the file names: a pid file can be seen before its content is written
        return {int(p.name.rsplit("-", 1)[1]) for p in pids.iterdir()}

    deadline = time.time() + 120
    while len(workers()) < 2 and time.time() < deadline:  # one worker may start its second cell first
        time.sleep(0.2)
    if len(workers()) < 2:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("workers did not start")
    return proc, workers()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_a_local_sweep_at_once(micro_checkpoint, tmp_path):
    """Ctrl-C ends the running cells (they record nothing) and the queue (no cell starts after
    it); the sweep exits 130 and its workers are gone.  Each cell first waits 60 s (the test
    hook), so a sweep that let its running cells finish would record them."""
    proc, workers = _sweep(tmp_path, micro_checkpoint, delay="60")
    started = sorted(p.name for p in (tmp_path / "pids").iterdir())
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    try:
        proc.communicate(timeout=300)  # a hang guard only
    finally:  # a sweep that did not stop must not load the machine for the tests after this one
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    deadline = time.time() + 30  # a hang guard: the stop reaps its workers before it returns
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)
    assert sorted(p.name for p in (tmp_path / "pids").iterdir()) == started  # the queue did not run on
    assert ResultStore(tmp_path / "store").records() == []  # the running cells were ended, not finished


def test_workers_die_with_a_killed_parent(micro_checkpoint, tmp_path):
    proc, workers = _sweep(tmp_path, micro_checkpoint)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


# 5. malformed records ------------------------------------------------------------------------

@pytest.mark.parametrize("damage,why", [
    (lambda r: r.pop("protocol"), "'protocol' missing"),
    (lambda r: r["metrics"].update(ppl="abc"), "ppl"),
    (lambda r: r["metrics"].update(ppl=float("nan")), "ppl"),
    (None, "not valid JSON"),
])
def test_a_malformed_record_is_skipped_by_readers_then_quarantined_and_recomputed(micro_checkpoint, tmp_path, capsys,
                                                                                  damage, why):
    from qbench.results import cell_key

    results = tmp_path / "results"
    args = ["bench", "--model", str(micro_checkpoint), "--schemes", "fp32,w8a8-dyn,w4-rtn-g64", "--limit", LIMIT,
            "--results", str(results), "--quiet"]
    assert main(args) == 0
    store = ResultStore(results)
    [path] = [p for p in store.records_dir.glob("*.json") if json.loads(p.read_text())["scheme"] == "w8a8-dyn"]
    record = json.loads(path.read_text())
    if damage is None:
        path.write_text('{"key": "trunc')
    else:
        damage(record)
        record["key"] = path.stem  # keep the key: the content check must still catch it
        path.write_text(json.dumps(record))
        if cell_key(record["config"]) != path.stem:
            pytest.fail("damage changed the config")
    capsys.readouterr()
    for command in (["report", "--results", str(results)], ["compare", "--results", str(results)]):
        assert main(command) == 0
    err = capsys.readouterr().err
    assert path.name in err and why.split()[0].strip("'") in err
    assert not store.quarantined() and path.exists()  # readers skip it and move nothing
    assert main(args) == 0  # the cell is asked for again: the bench quarantines the file and recomputes it
    assert len(store.quarantined()) == 1
    assert path.exists() and store.get(path.stem)["status"] == "ok"


# smaller ones ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--limit", "0"], "--limit must be a positive integer"),
    (["--limit", "-5"], "--limit must be a positive integer"),
    (["--calibration-seeds", "x"], "--calibration-seeds: 'x' is not a seed"),
    (["--schemes", ""], "--schemes is empty"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--task-limit", "abc"], "--task-limit must be a positive integer"),
])
def test_bad_options_fail_before_any_work(micro_checkpoint, tmp_path, capsys, args, needle):
    base = {"--model": str(micro_checkpoint), "--schemes": "fp32", "--limit": LIMIT}
    for option, value in zip(args[::2], args[1::2]):
        base[option] = value
    results = tmp_path / "results"
    assert main(["bench", *[x for kv in base.items() for x in kv], "--results", str(results), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (results / "records").exists() or not list((results / "records").glob("*.json"))


def test_empty_model_text_file_model_and_suite_limit(micro_checkpoint, tmp_path, capsys):
    assert main(["bench", "--model", "", "--results", str(tmp_path / "r")]) == EXIT_USAGE
    assert "--model is empty" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["bench", "--model", str(text), "--results", str(tmp_path / "r")]) == EXIT_USAGE
    assert "a file, not a checkpoint folder" in capsys.readouterr().err
    suite = tmp_path / "s.yaml"
    suite.write_text(f"models: [{micro_checkpoint}]\nschemes: [fp32]\nlimit: abc\n")
    assert main(["sweep", str(suite), "--results", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "limit must be a positive integer" in err


def test_results_path_that_is_a_file_is_reported_before_any_cell(micro_checkpoint, tmp_path, capsys, monkeypatch):
    import qbench.runner as bench

    monkeypatch.setattr(bench, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    assert main(["bench", "--model", str(micro_checkpoint), "--schemes", "fp32", "--limit", LIMIT,
                 "--results", str(blocker), "--quiet"]) == EXIT_STORE
    assert "is a file" in capsys.readouterr().err


def test_records_get_the_umask_mode(micro_checkpoint, tmp_path):
    old = os.umask(0o002)
    try:
        assert main(["bench", "--model", str(micro_checkpoint), "--schemes", "fp32", "--limit", LIMIT,
                     "--results", str(tmp_path / "r"), "--quiet"]) == 0
    finally:
        os.umask(old)
    [path] = (tmp_path / "r" / "records").glob("*.json")
    assert path.stat().st_mode & 0o777 == 0o664


def test_bench_prints_delta_against_the_stored_fp32_record(micro_checkpoint, tmp_path, capsys):
    common = ["--model", str(micro_checkpoint), "--limit", LIMIT, "--results", str(tmp_path / "r"), "--quiet"]
    assert main(["bench", "--schemes", "fp32", *common]) == 0
    capsys.readouterr()
    assert main(["bench", "--schemes", "w8a8-dyn", *common]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if "w8a8-dyn" in line][0]
    fields = row.split()
    delta = fields[fields.index("ok") + 4]  # n, ppl, ppl_std, delta_ppl
    ppl = {r["scheme"]: r["metrics"]["ppl"] for r in ResultStore(tmp_path / "r").records()}
    # printed with 4 significant digits (format_table): within half a unit of the fourth, 5e-4 relative
    assert delta != "-" and float(delta) == pytest.approx(ppl["w8a8-dyn"] - ppl["fp32"], rel=5e-4)


def test_blimp_task_limit_is_honoured(tmp_path):
    from qbench.eval.catalogue import get_task
    from qbench.eval.lm_eval_tasks import blimp_dir

    if not blimp_dir().is_dir():
        pytest.skip("no BLiMP data on this machine")
    default, five = get_task("qbench_blimp").spec(None), get_task("qbench_blimp").spec(5)
    assert default["limit"] == 20 and five["limit"] == 5
    assert default["protocol"].endswith("x20") and five["protocol"].endswith("x5")


def test_first_token_is_a_protocol_parameter(micro_checkpoint):
    from qbench.eval.protocols import resolve_protocol
    from qbench.eval.perplexity import protocol_windows
    from qbench.zoo import load_model

    loaded = load_model(str(micro_checkpoint))
    default = resolve_protocol(loaded, 3000)
    eos = resolve_protocol(loaded, 3000, first_token=loaded.tokenizer.eos_token)
    assert "first_token" not in default.to_dict() and default.id.startswith("nonoverlap-w64-bos-")
    assert eos.to_dict()["first_token"] == loaded.tokenizer.eos_token and "-bos-" not in eos.id
    windows, _, _ = protocol_windows(eos, loaded.tokenizer)
    assert int(windows[0][0]) == loaded.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="not a token"):
        protocol_windows(resolve_protocol(loaded, 3000, first_token="no-such-token-xyz"), loaded.tokenizer)


def test_sink_rate_conventions():
    """Ours excludes query 0, Gu et al.'s includes it (query 0 gives token 0 weight 1)."""
    import torch

    from qbench.probes.stats import AttentionProbe

    probe = AttentionProbe()
    column = torch.tensor([[[1.0, 0.2, 0.2, 0.2]]])  # (B=1, H=1, T=4): P[i, 0]
    probe.observe_first(0, column)
    summary = probe.summary()
    assert summary["sink_rate@0.3"] == 0.0  # mean of 0.2, 0.2, 0.2
    assert summary["sink_rate_gu@0.3"] == 100.0  # mean of 1, 0.2, 0.2, 0.2 = 0.4
    assert "query 0 excluded" in summary["sink_rate_convention"]


# Records of any shape, weights that overflow, bounded inputs, a dead worker, exit codes
# ------------------------------------------------------------------------------------------------

import errno  # noqa: E402
import shutil  # noqa: E402

from qbench.cli import EXIT_DATA  # noqa: E402


from no_hang import no_hang  # noqa: E402


@pytest.fixture(scope="module")
def three_cells(micro_checkpoint, tmp_path_factory):
    """A store with the micro model's fp32, w8a8-dyn and w4-rtn-g64 records (copied per test)."""
    results = tmp_path_factory.mktemp("three") / "results"
    args = ["bench", "--model", str(micro_checkpoint), "--schemes", "fp32,w8a8-dyn,w4-rtn-g64", "--limit", LIMIT,
            "--results", str(results), "--quiet"]
    assert main(args) == 0
    return results, args


def _poison(path, how):
    record = json.loads(path.read_text())
    if how == "kl list":
        record["metrics"]["kl"] = [1, 2]
    elif how == "kl dict":
        record["metrics"]["kl"] = {"a": 1}
    elif how in ("kl 10**400", "kl 10**5000", "deep array"):
        record["metrics"]["kl"] = "PLACEHOLDER"
        literal = {"kl 10**400": "1" + "0" * 400, "kl 10**5000": "1" + "0" * 5000,
                   "deep array": "[" * 100_000 + "]" * 100_000}[how]
        path.write_text(json.dumps(record).replace('"PLACEHOLDER"', literal))
        return
    elif how == "symlink to /dev/zero":
        path.unlink()
        path.symlink_to("/dev/zero")
        return
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
        return
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("how,why", [
    ("kl list", "'kl' is not a number"), ("kl dict", "'kl' is not a number"),
    ("kl 10**400", "integer of 401 digits"), ("kl 10**5000", "not valid JSON"),
    ("deep array", "not valid JSON"), ("symlink to /dev/zero", "symbolic link"), ("fifo", "not a regular file"),
])
def test_a_record_of_any_shape_is_quarantined_not_raised(three_cells, tmp_path, capsys, how, why):
    """A record whose fields could make report/compare/bench raise (TypeError, OverflowError,
    RecursionError, MemoryError) or hang is quarantined with a one-line reason."""
    template, args = three_cells
    results = tmp_path / "results"
    shutil.copytree(template, results, symlinks=True)
    store = ResultStore(results)
    [path] = [p for p in store.records_dir.glob("*.json") if json.loads(p.read_text())["scheme"] == "w8a8-dyn"]
    _poison(path, how)
    capsys.readouterr()
    with no_hang(60):
        assert main(["report", "--results", str(results)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if path.name in line]
    assert len(warnings) == 1 and why in warnings[0] and len(warnings[0]) < 400
    assert not store.quarantined() and os.path.lexists(path)  # the report moves nothing
    with no_hang(60):
        assert main(["compare", "--results", str(results)]) == 0
        assert main([*args[:-3], "--results", str(results), "--quiet"]) == 0  # bench quarantines and recomputes
    assert len(store.quarantined()) == 1 and store.get(path.stem)["status"] == "ok"


def test_overflowing_weights_make_a_failed_cell_and_the_bench_goes_on(micro_checkpoint, tmp_path, capsys):
    """Weights with 4 KB past the safetensors header XORed with 0xFF give a huge finite NLL:
    the cell is recorded as failed (no OverflowError out of math.exp) and the others run."""
    bad = tmp_path / "bad"
    shutil.copytree(micro_checkpoint, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:start + 4096] = bytes(b ^ 0xFF for b in data[start:start + 4096])
    weights.write_bytes(bytes(data))
    results = tmp_path / "results"
    code = main(["bench", "--model", f"{bad},{micro_checkpoint}", "--schemes", "fp32,w8a8-dyn", "--limit", LIMIT,
                 "--results", str(results), "--quiet"])
    assert code == 1  # failed cells recorded, the others ran
    records = ResultStore(results).records()
    assert len(records) == 4
    failed = [r for r in records if r["status"] == "failed"]
    assert {r["model"] for r in failed} == {str(bad)} and len(failed) == 2
    assert all("ppl = inf" in r["error"] for r in failed)
    assert all(r["status"] == "ok" for r in records if r["model"] != str(bad))
    assert "Traceback" not in capsys.readouterr().err


def test_perplexity_overflow_is_a_non_finite_error():
    from qbench.eval.perplexity import NonFiniteError, perplexity

    assert perplexity(10.0, 10, "token", "p") == pytest.approx(2.718281828)
    with pytest.raises(NonFiniteError, match="ppl = inf"):
        perplexity(1e6, 10, "token", "p")


def test_a_config_asking_for_a_million_layers_is_refused_before_allocating(micro_checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
    """A config with n_layer 1000000 (or a width past memory) is one line, exit 3, and no
    model is built."""
    bad = tmp_path / "huge"
    shutil.copytree(micro_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["n_layer"] = 1_000_000
    (bad / "config.json").write_text(json.dumps(config))
    from qbench.modeling import QBenchForCausalLM

    built, real_init = [], QBenchForCausalLM.__init__

    def counting_init(self, *args, **kwargs):  # refused before allocating: no model is ever built
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(QBenchForCausalLM, "__init__", counting_init)
    with no_hang(120):
        assert main(["bench", "--model", str(bad), "--schemes", "fp32", "--limit", LIMIT, "--results",
                     str(tmp_path / "r"), "--quiet"]) == EXIT_CHECKPOINT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1000000 layers" in err and built == []
    config["n_layer"], config["d_model"], config["n_head"] = 2, 4096, 2  # the width too
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["bench", "--model", str(bad), "--schemes", "fp32", "--limit", LIMIT, "--results",
                 str(tmp_path / "r"), "--quiet"]) == EXIT_CHECKPOINT
    assert "needs more parameters" in capsys.readouterr().err


def test_a_billion_laughs_suite_is_refused_at_once(micro_checkpoint, tmp_path, capsys):
    """Aliases under valid keys (~10^9 strings once expanded) are refused at the first
    alias, in one line; a list where a name belongs is named, never str()-ed."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        lines.append(f"{chr(97 + level)}: &{chr(97 + level)} [" + ",".join([f"*{chr(96 + level)}"] * 9) + "]")
    suite = tmp_path / "laughs.yaml"
    entries = "\n  ".join(f"- {line.split(': ', 1)[1]}" for line in lines)
    suite.write_text(f"models:\n  {entries}\nschemes: [fp32]\n")
    with no_hang(60):  # a hang guard only: refused at the first alias, before any expansion
        assert main(["sweep", str(suite), "--results", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "alias" in err and len(err) < 500
    nested = tmp_path / "nested.yaml"  # no alias, but a list where a name belongs: no str() of it
    nested.write_text(f"models: [{micro_checkpoint}, [[1, 2], [3]]]\nschemes: [fp32]\n")
    assert main(["sweep", str(nested), "--results", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "entry 2 is a list" in err


@pytest.mark.parametrize("args,needle", [
    (["--calibration-seeds", "99999999999999999999999"], "out of range"),
    (["--limit", "9" * 30], "--limit must be at most"),
    (["--limit", "9" * 5000], "--limit must be a positive integer"),
])
def test_integers_out_of_range_are_usage_errors(micro_checkpoint, tmp_path, capsys, args, needle):
    """An integer argument out of range is one usage line and nothing is recorded, not even
    for a calibrated scheme (which would store a failed record)."""
    results = tmp_path / "results"
    assert main(["bench", "--model", str(micro_checkpoint), "--schemes", "fp32,w4-gptq-g128", "--limit", LIMIT,
                 "--results", str(results), "--quiet", *args]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and len(err) < 500
    assert not (results / "records").exists() or not list((results / "records").glob("*.json"))


def test_workers_out_of_range(micro_checkpoint, tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"models: [{micro_checkpoint}]\nschemes: [fp32]\nlimit: {LIMIT}\n")
    assert main(["sweep", str(suite), "--workers", "100000", "--results", str(tmp_path / "r")]) == EXIT_USAGE
    assert "--workers must be at most 256" in capsys.readouterr().err


@pytest.mark.parametrize("corpus", ["/dev/zero", "fifo"])
def test_a_corpus_that_is_not_a_regular_file(micro_checkpoint, tmp_path, capsys, corpus):
    """--corpus /dev/zero or a FIFO is one line (exit 4), neither read (no MemoryError, no hang)."""
    if corpus == "fifo":
        corpus = str(tmp_path / "pipe.txt")
        os.mkfifo(corpus)
    with no_hang(60):
        assert main(["bench", "--model", str(micro_checkpoint), "--schemes", "fp32", "--corpus", corpus,
                     "--results", str(tmp_path / "r"), "--quiet"]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a regular file" in err


def test_stopping_workers_survives_one_already_reaped():
    """Stopping the pool after one worker died and was reaped (the executor's manager thread
    reaps too) neither raises ProcessLookupError ("[Errno 3] No such process", which made
    `sweep --workers 2` exit 2) nor leaves the other worker running.  Reproduced deterministically:
    one worker killed and reaped behind the pool's back, then the pool stopped.  The other
    worker's exit code must be known when the stop returns (the executor's manager thread reaps
    workers too; reading too early saw a reaped worker as alive, exit code None, 3 in 30 runs),
    since the sweep charges the dead cell by exit code."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from qbench.sweep import _stop_workers

    pool = ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"))
    assert list(pool.map(abs, [-1, -2])) == [1, 2]  # both workers started
    victim, other = list(pool._processes.values())
    os.kill(victim.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # the executor's manager thread may reap it first
        os.waitpid(victim.pid, 0)
    victim._popen.returncode = None  # the race's window: reaped, its Process object not yet told
    _stop_workers(pool)  # raised ProcessLookupError before
    assert not other.is_alive() and other.exitcode == -signal.SIGTERM


def test_one_killed_worker_loses_at_most_its_cell(micro_checkpoint, tmp_path):
    """kill -9 of one `sweep --workers 2` worker: the pool is rebuilt and the cell retried
    (no BrokenProcessPool); a cell whose worker dies twice is recorded as failed; the sweep
    finishes the other cells; the summary counts from the store."""
    suite = tmp_path / "suite.yaml"
    schemes = ["fp32", "w8a8-dyn", "w4-rtn-g64", "w8a8-pt", "w6a6"]
    suite.write_text(f"models: [{micro_checkpoint}]\nschemes: [{', '.join(schemes)}]\nlimit: {LIMIT}\n")
    pids, log = tmp_path / "pids", tmp_path / "computed.log"
    pids.mkdir()
    proc = qbench("sweep", str(suite), "--workers", "2", "--results", str(tmp_path / "store"), "--quiet",
                  env=with_test_hooks(ENV, QBENCH_TEST_PID_DIR=str(pids), QBENCH_TEST_CELL_DELAY="5",
                                      QBENCH_CACHE=str(tmp_path / "cache"), QBENCH_TEST_COMPUTE_LOG=str(log)),
                  start_new_session=True)

    def wait_for(predicate, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = predicate()
            if found:
                return found
            time.sleep(0.1)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out; pid files {sorted(p.name for p in pids.iterdir())}; sweep stderr: {err[-3000:]}")

    def running_cell(pid: str) -> str:
        """The cell a worker was running when it was killed: its newest pid file (a starved
        test may kill it after it finished the cell it was first seen on)."""
        files = [p for p in pids.iterdir() if p.name.endswith(f"-{pid}")]
        return max(files, key=lambda p: p.stat().st_mtime_ns).name.rsplit("-", 1)[0]

    victim_pid = wait_for(lambda: sorted(pids.iterdir()))[0].name.rsplit("-", 1)[1]
    os.kill(int(victim_pid), signal.SIGKILL)  # once: the cell is retried
    victim_key = running_cell(victim_pid)
    retry = wait_for(lambda: [p for p in pids.iterdir() if p.name.startswith(victim_key + "-")
                              and not p.name.endswith(f"-{victim_pid}")])[0]
    retry_pid = retry.name.rsplit("-", 1)[1]
    os.kill(int(retry_pid), signal.SIGKILL)  # twice: recorded as failed
    assert running_cell(retry_pid) == victim_key
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]  # a failed cell recorded, the others ran
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    store = ResultStore(tmp_path / "store")
    records = {r["key"]: r for r in store.records()}
    assert len(records) == len(schemes) and not store.quarantined()
    assert records[victim_key]["status"] == "failed" and "died twice" in records[victim_key]["error"]
    assert all(r["status"] == "ok" for k, r in records.items() if k != victim_key)
    computed = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(computed) == sorted(set(computed))  # no cell computed twice
    assert "'computed': 5" in out and "'failed': 1" in out


def test_report_on_a_full_disk_exits_5_and_leaves_no_partial_plot(three_cells, tmp_path, capsys, monkeypatch):
    """A full disk while writing the report is exit 5, and no plot is left half written
    (plots are written to a temporary file and renamed)."""
    from matplotlib.figure import Figure

    template, _ = three_cells
    results = tmp_path / "results"
    shutil.copytree(template, results)

    def full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    from pathlib import Path

    monkeypatch.setattr(Figure, "savefig", full)
    assert main(["report", "--results", str(results)]) == EXIT_STORE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert not [p for p in results.rglob("*") if p.suffix in (".png", ".tmp")]


def test_a_file_where_a_folder_belongs_exits_5(micro_checkpoint, tmp_path, capsys):
    """sweep and bench with a results path that is a file, or records/.locks that is a
    file, exit 5 with one line (no raw Errno)."""
    suite = tmp_path / "s.yaml"
    suite.write_text(f"models: [{micro_checkpoint}]\nschemes: [fp32]\nlimit: {LIMIT}\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sweep", str(suite), "--results", str(blocker)]) == EXIT_STORE
    assert "is a file" in capsys.readouterr().err
    results = tmp_path / "results"
    (results / "records").mkdir(parents=True)
    (results / "records" / ".locks").write_text("x")
    for command in (["sweep", str(suite), "--results", str(results), "--quiet"],
                    ["bench", "--model", str(micro_checkpoint), "--schemes", "fp32", "--limit", LIMIT,
                     "--results", str(results), "--quiet"]):
        assert main(command) == EXIT_STORE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ".locks is not a folder" in err


@pytest.mark.parametrize("length", [300, 5000])
def test_a_long_model_name_gives_one_short_line(tmp_path, capsys, length):
    """A 300- or 5,000-character --model is one short usage line (no raw Errno 36 with the name)."""
    assert main(["bench", "--model", "m" * length, "--results", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 300 and f"{length} characters" in err


def test_a_computed_record_the_schema_refuses_is_stored_as_failed():
    """A metric that came out inf (kl of a broken model) must not make an ok record that the
    next reader quarantines: it is written as failed, with the reason."""
    from qbench.record import validate_record
    from record_factory import make_record

    record = make_record("m", "w8a8-dyn", "ppl", {"ppl": 12.0, "kl": float("inf"), "tokens": 10})
    checked = record.schema_checked()
    assert checked["status"] == "failed" and "'kl'" in checked["error"]
    assert checked["metrics"] == {"ppl": 12.0, "tokens": 10} and validate_record(checked, checked["key"]) is None
