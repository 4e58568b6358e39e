"""Sweeps: suite files, the local executor, and a real Ray cluster on 127.0.0.1 (a head
and a second worker node) with a worker killed in the middle of a cell."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hook_env import with_test_hooks
from qbench.results import ResultStore
from qbench.plan import SuiteError, load_suite, plan_suite
from qbench.sweep import run_sweep


def write_suite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def micro_suite(tmp_path, checkpoint) -> Path:
    return write_suite(tmp_path / "micro.yaml", f"""
name: micro
models: [{checkpoint}]
schemes: [fp32, w8a8-dyn, w6a6]
tasks: [ppl]
calibration_seeds: [0]
limit: 3000
resources: {{num_cpus: 1}}
""")


def test_suite_typos_and_unknown_names_are_specific_errors(tmp_path, micro_checkpoint):
    with pytest.raises(SuiteError, match="unknown key 'schemse'; did you mean 'schemes'"):
        load_suite(write_suite(tmp_path / "a.yaml", "models: [x]\nschemse: [fp32]\nschemes: [fp32]\n"))
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "absent.yaml")
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(write_suite(tmp_path / "b.yaml", "models: [x\n"))
    with pytest.raises(SuiteError, match="unknown arm 'vgaa' in `arms`; did you mean 'vga'"):
        load_suite(write_suite(tmp_path / "e.yaml", "models: [x]\narms: [vgaa]\nschemes: [fp32]\n"))
    with pytest.raises(SuiteError, match="`schemes` must list"):
        load_suite(write_suite(tmp_path / "c.yaml", "models: [x]\n"))
    suite = load_suite(write_suite(tmp_path / "d.yaml", f"models: [{micro_checkpoint}]\nschemes: [w8a8-dynn]\n"))
    with pytest.raises(SuiteError, match="suite .d.: unknown scheme .w8a8-dynn.; did you mean .w8a8-dyn."):
        plan_suite(suite)
    suite = load_suite(micro_suite(tmp_path, micro_checkpoint))
    with pytest.raises(SuiteError, match="unknown executor 'rey'; did you mean 'ray'"):
        run_sweep(suite, str(tmp_path / "r"), executor="rey")


def test_local_sweep_runs_only_missing_cells(tmp_path, micro_checkpoint):
    suite = load_suite(micro_suite(tmp_path, micro_checkpoint))
    results = tmp_path / "results"
    first = run_sweep(suite, str(results), progress=False)
    assert first == {**first, "cells": 3, "computed": 3, "failed": 0, "already_recorded": 0}
    victim = sorted((results / "records").glob("*.json"))[0]
    victim.unlink()
    second = run_sweep(suite, str(results), progress=False)
    assert second["already_recorded"] == 2 and second["computed"] == 1


def test_sweep_workers_receive_planned_cells_and_plan_nothing(tmp_path, micro_checkpoint, monkeypatch):
    """The parent plans once; each spawned worker gets the PlannedCell itself (its planning
    entry points raise there) and the records are those of the planned keys."""
    import qbench.plan
    import qbench.sweep
    import sweep_guard

    suite = load_suite(micro_suite(tmp_path, micro_checkpoint))
    calls = []
    real_plan_suite = qbench.plan.plan_suite

    def counting(s):
        calls.append(s.name)
        return real_plan_suite(s)

    monkeypatch.setattr(qbench.sweep, "plan_suite", counting)
    monkeypatch.setattr(qbench.sweep, "_worker_init", sweep_guard.no_planning_worker)
    guard = tmp_path / "guard"
    guard.mkdir()
    monkeypatch.setenv("QBENCH_SWEEP_GUARD_DIR", str(guard))
    results = tmp_path / "results"
    summary = qbench.sweep.run_sweep(suite, str(results), workers=2, progress=False)
    assert calls == ["micro"]  # planned once, in the parent
    assert summary == {**summary, "cells": 3, "computed": 3, "failed": 0}
    received = {p.name.split("-", 1)[1]: p.read_text() for p in guard.iterdir()}
    keys = {p.cell.key for p in real_plan_suite(suite)}
    assert set(received) == keys and set(received.values()) == {"qbench.plan.PlannedCell"}
    assert {p.stem for p in (results / "records").glob("*.json")} == keys


def test_a_planned_cell_pickles_and_its_model_refuses_changed_weights(tmp_path, micro_checkpoint):
    """What a sweep ships: the PlannedCell round-trips through pickle (model reference
    without its loader, resolved Scheme, protocol); loading re-checks the checkpoint hash
    the key was made from, so weights changed after planning are refused, not measured."""
    import pickle

    from qbench.plan import plan_cells
    from qbench.zoo import CheckpointError

    copy = tmp_path / "copy"
    shutil.copytree(micro_checkpoint, copy)
    [planned] = plan_cells([str(copy)], ["w8a8-pt"], ["ppl"], limit=3000, calibration_seeds=[1])
    shipped = pickle.loads(pickle.dumps(planned))
    assert shipped.cell.key == planned.cell.key and shipped.cell.scheme == planned.cell.scheme
    assert shipped.cell.scheme.options["calibration_seed"] == 1 and shipped.protocol == planned.protocol
    assert shipped.model_ref.load().checkpoint_hash == planned.model_ref.checkpoint_hash
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])  # same size, other weights
    weights.write_bytes(bytes(data))
    again = pickle.loads(pickle.dumps(planned))
    with pytest.raises(CheckpointError, match="changed since"):
        again.model_ref.load()


def test_a_suite_with_stages_plans_each_key_once(tmp_path, micro_checkpoint):
    suite = load_suite(write_suite(tmp_path / "staged.yaml", f"""
name: staged
limit: 3000
models: [{micro_checkpoint}]
stages:
  - name: first
    schemes: [fp32, w8a8-pt]
    calibration_seeds: [0]
  - name: more draws
    schemes: [fp32, w8a8-pt]
    calibration_seeds: [0, 1]
  - name: whole split
    schemes: [fp32]
    limit: null
"""))
    assert [s.name for s in suite.stages] == ["first", "more draws", "whole split"]
    assert suite.stage("whole split").limit is None and suite.stage("first").limit == 3000
    planned = plan_suite(suite)
    described = [(p.cell.scheme.name, p.cell.scheme.options.get("calibration_seed"), p.protocol.max_chars)
                 for p in planned]
    assert described == [("fp32", None, 3000), ("w8a8-pt", 0, 3000), ("w8a8-pt", 1, 3000), ("fp32", None, None)]
    with pytest.raises(SuiteError, match="stage 2: unknown key 'schemse'"):
        load_suite(write_suite(tmp_path / "bad.yaml", "models: [x]\nschemes: [fp32]\nstages: [{}, {schemse: [a]}]\n"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path, monkeypatch):
    """A head node and one extra worker node on this machine, one CPU each."""
    pytest.importorskip("ray")
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    # the test hooks on the workers' path (tests/hooks/sitecustomize.py): a test can find the worker of a cell
    env = with_test_hooks(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--include-dashboard", "false", *common], check=True, env=env, capture_output=True, timeout=180)
    try:
        subprocess.run([ray_bin, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                        *common], check=True, env=env, capture_output=True, timeout=180)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for this test's driver only
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_sweep_survives_a_killed_worker_and_matches_the_local_executor(tmp_path, micro_checkpoint, ray_cluster,
                                                                           monkeypatch):
    import ray

    suite = load_suite(micro_suite(tmp_path, micro_checkpoint))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    monkeypatch.setenv("QBENCH_TEST_PID_DIR", str(pid_dir))  # forwarded to the Ray workers (QBENCH_*)
    monkeypatch.setenv("QBENCH_TEST_CELL_DELAY", "3")
    results = tmp_path / "ray-results"
    killed = []

    def killer():  # SIGKILL the first worker that starts a cell, while it is in the cell
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            files = sorted(pid_dir.iterdir())
            if files:
                pid = int(files[0].name.rsplit("-", 1)[1])  # the name: its content may not be written yet
                os.kill(pid, signal.SIGKILL)
                killed.append(files[0].name)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        summary = run_sweep(suite, str(results), executor="ray", address=ray_cluster, progress=False)
    finally:
        thread.join()
        if ray.is_initialized():
            ray.shutdown()
    assert killed, "no worker started a cell"
    killed_key = killed[0].rsplit("-", 1)[0]
    attempts = [p.name for p in pid_dir.iterdir() if p.name.startswith(killed_key)]
    assert len(attempts) >= 2  # the killed cell ran again on another worker
    assert summary["cells"] == 3 and summary["failed"] == 0
    records = {p.stem for p in (results / "records").glob("*.json")}
    assert records == {p.cell.key for p in plan_suite(suite)}  # every cell exactly once (one file per key)
    monkeypatch.delenv("QBENCH_TEST_PID_DIR")
    local = tmp_path / "local-results"
    run_sweep(suite, str(local), progress=False)
    ray_store, local_store = ResultStore(results), ResultStore(local)
    for key in records:
        a, b = ray_store.get(key), local_store.get(key)
        assert a["metrics"] == b["metrics"]  # same seeds, one thread each: bit for bit


def test_a_one_process_sweep_lets_each_model_go_after_its_last_cell(tmp_path, micro_checkpoint, monkeypatch):
    """`--workers 1` runs cells in this process: a model is loaded for its first missing cell
    and released after its last, so a `models: all` suite never holds the whole zoo."""
    import qbench.sweep as sweep
    from qbench.plan import plan_cells

    copy = tmp_path / "copy"
    shutil.copytree(micro_checkpoint, copy)
    planned = plan_cells([str(micro_checkpoint), str(copy)], ["fp32", "w8a8-dyn"], ["ppl"], limit=2000)
    held = []
    original = sweep.run_planned_cell

    def watch(cell, results_dir, threads=1):
        out = original(cell, results_dir, threads)
        held.append(sum(ref._loaded is not None for ref in {id(p.model_ref): p.model_ref for p in planned}.values()))
        return out

    monkeypatch.setattr(sweep, "run_planned_cell", watch)
    sweep.run_local(planned, str(tmp_path / "results"), workers=1, progress=False)
    assert held == [1, 1, 1, 1]  # never both models at once (the first is let go before the copy loads)
    assert all(p.model_ref._loaded is None for p in planned)
