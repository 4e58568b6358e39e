"""Issue 13: each hole reproduced as described, now closed."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

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
                  env={"QBENCH_SWEEP_PID_DIR": str(pids), "QBENCH_SWEEP_TEST_DELAY": delay,
                       "QBENCH_CACHE": str(tmp_path / "cache")}, start_new_session=True)
    deadline = time.time() + 120
    while len(list(pids.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = {int(p.read_text()) for p in pids.iterdir()}
    assert len(workers) == 2, "workers did not start"
    return proc, workers


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
    proc, workers = _sweep(tmp_path, micro_checkpoint)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    start = time.time()
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - start < 30  # running cells are ended within seconds, not run to the end of the queue
    time.sleep(1)
    assert not any(_alive(w) for w in workers)
    # the queue did not run on: at most the two cells that were running (in their 3 s test delay) recorded
    assert len(ResultStore(tmp_path / "store").records()) <= 2


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
def test_a_malformed_record_is_quarantined_and_recomputed(micro_checkpoint, tmp_path, capsys, damage, why):
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
    assert len(store.quarantined()) == 1 and not path.exists()
    assert main(args) == 0  # the cell is asked for again: recomputed
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
    import qbench.bench as bench

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
    assert delta != "-" and float(delta) == pytest.approx(float(delta))


def test_blimp_task_limit_is_honoured(tmp_path):
    from qbench.bench import lm_eval_spec
    from qbench.eval.lm_eval_tasks import blimp_dir

    if not blimp_dir().is_dir():
        pytest.skip("no BLiMP data on this machine")
    default, five = lm_eval_spec("qbench_blimp", None), lm_eval_spec("qbench_blimp", 5)
    assert default["limit"] == 20 and five["limit"] == 5
    assert default["protocol"].endswith("x20") and five["protocol"].endswith("x5")


def test_first_token_is_a_protocol_parameter(micro_checkpoint):
    from qbench.bench import resolve_protocol
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
