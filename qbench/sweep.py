"""Sweeps: a suite file (suites/*.yaml) is planned once, here (qbench.plan); the planned
cells the store lacks are shipped as they are to an executor, `local` (this process, or a small process pool) or `ray` (one Ray task per
cell on an existing cluster, or a local one started for the sweep).

Workers write their records into the shared result store themselves (atomic write of
records/<key>.json), so a record exists exactly once per cell whatever happens to a
worker: a worker killed mid-cell wrote nothing and Ray retries the task elsewhere; a
retry of a cell whose record landed finds it and does no work.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from qbench.plan import PlannedCell, Suite, SuiteError, last_uses, plan_suite
from qbench.suggest import closest

EXECUTORS = ("local", "ray")


def run_planned_cell(planned: PlannedCell, results_dir: str, threads: int = 1) -> dict:
    """Worker side: run one planned cell, as it was shipped, into the store (or find it
    there); returns a summary (counts, and `failed_records`: the records of the cells that
    failed in this sweep).  A worker plans nothing."""
    import torch

    from qbench.validate import cap_threads

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cap_threads(threads))  # never past this machine's cores
    try:
        return _run_planned_cell(planned, results_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _run_planned_cell(planned: PlannedCell, results_dir: str) -> dict:
    from qbench.runner import run_planned
    from qbench.results import ResultStore

    key = planned.cell.key
    store = ResultStore(results_dir)
    existing = store.get(key)
    if existing is not None:
        return {"key": key, "status": existing.get("status"), "computed": False, "pid": os.getpid()}
    record = run_planned(planned, store)  # its model reference checks the checkpoint is the planned one
    return {"key": key, "status": record.get("status"), "computed": True, "pid": os.getpid()}


def _worker_init(parent: int) -> None:
    """In each local worker: Ctrl-C is the parent's to handle (it stops the queue and ends
    the workers), and the worker dies with its parent: PR_SET_PDEATHSIG where Linux has it,
    and a watchdog thread on the parent's pid everywhere."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watchdog():
        while True:
            if os.getppid() != parent:
                os._exit(137)
            time.sleep(0.5)

    threading.Thread(target=watchdog, daemon=True, name="qbench-parent-watchdog").start()


def _stop_workers(pool) -> None:
    """Cancel every queued cell and end the running ones (their records are never half
    written: the store writes atomically, and a cell's lock dies with its process)."""
    # the process list first: shutdown() drops the executor's reference to it
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        # terminate(), not os.kill(pid): the executor's manager thread may reap a worker that
        # died meanwhile (killed from outside), and a reaped pid is ESRCH, or someone else's
        process.terminate()
    deadline = time.time() + 5
    for process in processes:
        process.join(max(0.0, deadline - time.time()))
        if process.is_alive():
            process.kill()
    # The manager thread reaps them too, and a worker it has reaped reads as alive here (exit
    # code None) until that thread, waiting for the GIL, records its exit code: wait for every
    # exit code (bounded), so the caller can tell which worker died of what.
    deadline = time.time() + 5
    while any(process.exitcode is None for process in processes) and time.time() < deadline:
        time.sleep(0.02)


def _why(code: int | None) -> str:
    import signal

    if code is None:
        return "exit status unknown"
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _record_dead_cell(planned: PlannedCell, results_dir: str, why: str) -> dict:
    """A cell whose worker died on its retry too: recorded as failed, with the reason."""
    from qbench.runner import failed_record
    from qbench.results import ResultStore

    store, key = ResultStore(results_dir), planned.cell.key
    if (existing := store.get(key)) is not None:  # it landed after all (died after the write)
        return {"key": key, "status": existing.get("status"), "computed": False, "pid": None}
    store.put(failed_record(planned, f"WorkerDied: the worker running this cell died twice ({why}); "
                                     "`qbench bench --force` on it tries again"))
    return {"key": key, "status": "failed", "computed": True, "pid": None}


def _name(planned: PlannedCell) -> str:
    return f"{planned.cell.model} {planned.cell.scheme.name} {planned.cell.task}"


def run_local(cells: list[PlannedCell], results_dir: str, workers: int = 1, progress: bool = True,
              retries: int = 1, threads: int = 1) -> list[dict]:
    """Run the planned cells here (workers <= 1) or in `workers` spawned processes, each
    shipped as it is.  A worker that
    dies (killed, out of memory) loses only its cell: its process is replaced, the other
    workers' cells go on, and the cell is retried `retries` times, then recorded as failed.  A cell that raises (its checkpoint changed under the sweep) is
    skipped with a warning; its error is raised once every other cell has run.  Ctrl-C
    stops at once: no new cell starts, running cells are abandoned (nothing partial is
    recorded), and KeyboardInterrupt reaches the caller (exit 130); workers never outlive
    this process."""
    from tqdm.auto import tqdm

    import sys

    from qbench.zoo import CheckpointError

    if workers <= 1:
        last = last_uses(cells)
        out, errors = [], []
        for index, cell in enumerate(tqdm(cells, desc="cells", disable=not progress)):
            try:
                out.append(run_planned_cell(cell, results_dir, threads))
            except CheckpointError as err:  # as in the pool: the others go on, the error is raised at the end
                errors.append(err)
                print(f"qbench sweep: warning: {_name(cell)} not run: {' '.join(str(err).split())[:300]}",
                      file=sys.stderr)
            if index in last:
                cell.model_ref.unload()
        if errors:
            raise errors[0]
        return out
    import multiprocessing as mp
    import signal
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    out = []
    interrupted = []

    def on_sigint(signum, frame):  # whatever the pool raises after Ctrl-C, the caller sees the interrupt
        interrupted.append(signum)
        raise KeyboardInterrupt

    def new_slot():
        # one single-process pool per worker, given one cell at a time: a worker that dies
        # breaks only its own pool, so the cells the other workers are running go on (one
        # shared pool terminates every worker when one dies, and their cells were computed twice)
        return ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))

    queue = deque(cells)
    deaths: dict[str, int] = {}
    errors: list[Exception] = []
    previous = signal.signal(signal.SIGINT, on_sigint)
    slots = [new_slot() for _ in range(min(workers, len(cells)))]
    running = {}  # future -> (slot index, cell)
    try:
        bar = tqdm(total=len(cells), desc="cells", disable=not progress)
        while queue or running:
            busy = {slot for slot, _ in running.values()}
            for slot in range(len(slots)):
                if slot not in busy and queue:
                    cell = queue.popleft()
                    running[slots[slot].submit(run_planned_cell, cell, results_dir, threads)] = (slot, cell)
            # short waits: the main thread gets to run the Ctrl-C handler promptly
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                slot, cell = running.pop(future)
                try:
                    out.append(future.result())
                except BrokenProcessPool:  # its worker died (killed, out of memory): rebuild that slot
                    processes = list((getattr(slots[slot], "_processes", None) or {}).values())
                    _stop_workers(slots[slot])
                    why = _why(processes[0].exitcode) if processes else "exit status unknown"
                    slots[slot] = new_slot()
                    key = cell.cell.key
                    deaths[key] = deaths.get(key, 0) + 1
                    print(f"qbench sweep: warning: the worker running {_name(cell)} died ({why}); "
                          + ("retrying it" if deaths[key] <= retries else "recording it as failed"), file=sys.stderr)
                    if deaths[key] <= retries:
                        queue.appendleft(cell)
                        continue
                    out.append(_record_dead_cell(cell, results_dir, why))
                except Exception as err:  # the cell raised (a checkpoint changed under it): the others go on
                    errors.append(err)
                    print(f"qbench sweep: warning: {_name(cell)} not run: "
                          f"{' '.join(str(err).split())[:300]}", file=sys.stderr)
                bar.update(1)
        bar.close()
    except BaseException:
        for pool in slots:
            _stop_workers(pool)
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    for pool in slots:
        pool.shutdown(wait=True)
    if errors:  # after every other cell ran: the first error, whose type gives the exit code
        raise errors[0]
    return out


def run_ray(cells: list[PlannedCell], results_dir: str, address: str | None = None, resources: dict | None = None,
            max_retries: int = 3, progress: bool = True) -> list[dict]:
    """One Ray task per planned cell, shipped as it is.  `address`: an existing cluster ("auto", "ray://host:10001" or
    "host:6379"); None starts a local one for this sweep.  The result store must be a
    path every node can write (a shared file system on a multi-node cluster)."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("the ray executor needs the `ray` package: pip install 'ray==2.60.0'") from err
    from tqdm.auto import tqdm

    from qbench.zoo import CheckpointError

    resources = {"num_cpus": 1, "num_gpus": 0, **(resources or {})}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith(("QBENCH_", "HF_")) or k == "TOKENIZERS_PARALLELISM"}})
    try:
        task = ray.remote(max_retries=max_retries, retry_exceptions=False, **resources)(run_planned_cell)
        results_dir = str(Path(results_dir).resolve())
        threads = max(1, int(resources.get("num_cpus", 1)))
        pending = {task.remote(c, results_dir, threads): c for c in cells}
        out, failures, checkpoint_errors = [], [], []
        bar = tqdm(total=len(pending), desc="cells (ray)", disable=not progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                out.append(ray.get(done[0]))
            except Exception as err:  # the cell failed on every attempt
                cause = getattr(err, "cause", None)  # a RayTaskError carries the worker's exception
                if isinstance(cause, CheckpointError):  # weights changed after planning: exit 3, as locally
                    checkpoint_errors.append(cause)
                failures.append(f"{_name(cell)}: {type(cause or err).__name__}: {cause or err}")
            bar.update(1)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
    if checkpoint_errors:
        raise checkpoint_errors[0]
    if failures:
        raise RuntimeError(f"{len(failures)} cell(s) failed after {max_retries} retries:\n" + "\n".join(failures))
    return out


def run_sweep(suite: Suite, results_dir: str, executor: str = "local", address: str | None = None,
              workers: int = 1, progress: bool = True) -> dict:
    """Run the cells of `suite` that the store lacks; returns counts."""
    from qbench.results import ResultStore

    if executor not in EXECUTORS:
        raise SuiteError(f"unknown executor {executor!r}{closest(executor, EXECUTORS)}")
    store = ResultStore(results_dir)
    store.check_writable()  # a file where the folder belongs: exit 5 before any planning
    planned = plan_suite(suite)  # once, here: the workers get these cells as they are
    # the sweep writes these cells: an invalid record file of one is quarantined here, once
    missing = [p for p in planned if store.get(p.cell.key, quarantine=True) is None]
    start = time.time()
    from qbench.zoo import CheckpointError

    try:
        if executor == "local":
            run_local(missing, results_dir, workers, progress, threads=max(1, int(suite.resources.get("num_cpus", 1))))
        else:
            run_ray(missing, results_dir, address, suite.resources, progress=progress)
    except CheckpointError as err:  # a checkpoint changed or vanished under the sweep: exit 3, with the counts
        raise CheckpointError(f"{' '.join(str(err).split())[:300]}; sweep {suite.name}: "
                              f"{_summary(store, planned, missing, start)}") from None
    return _summary(store, planned, missing, start)


def _summary(store, planned: list[PlannedCell], missing: list[PlannedCell], start: float) -> dict:
    # counted from the store, not from what workers said (a worker that found a record
    # another process had just written is not a computation of this sweep)
    now = [store.get(p.cell.key) for p in missing]
    summary = {"cells": len(planned), "already_recorded": len(planned) - len(missing),
               "computed": sum(1 for r in now if r is not None),
               "failed": sum(1 for r in now if r is not None and r.get("status") != "ok"),
               "seconds": round(time.time() - start, 1)}
    if any(r is None for r in now):
        summary["not_recorded"] = sum(1 for r in now if r is None)
    summary["failed_records"] = [r for r in now if r is not None and r.get("status") != "ok"]
    return summary
