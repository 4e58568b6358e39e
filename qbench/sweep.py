"""Sweeps: a suite file (suites/*.yaml) expands to cells; the cells the store lacks run on
an executor, `local` (this process, or a small process pool) or `ray` (one Ray task per
cell on an existing cluster, or a local one started for the sweep).

Workers write their records into the shared result store themselves (atomic write of
records/<key>.json), so a record exists exactly once per cell whatever happens to a
worker: a worker killed mid-cell wrote nothing and Ray retries the task elsewhere; a
retry of a cell whose record landed finds it and does no work.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from qbench.registry import closest

EXECUTORS = ("local", "ray")
SUITE_KEYS = {"name", "models", "schemes", "tasks", "calibration_seeds", "limit", "task_limit", "corpus",
              "resources"}


class SuiteError(ValueError):
    """The suite file is missing, unreadable or names something that does not exist."""


@dataclass
class Suite:
    name: str
    models: list[str]
    schemes: list[str]
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    calibration_seeds: list[int] | None = None
    limit: int | None = None
    task_limit: int | None = None
    corpus: str | None = None
    resources: dict = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})


MAX_SUITE_BYTES = 1 << 20


class _SuiteLoader(yaml.SafeLoader):
    """safe_load without aliases: a suite file is a few lists of names, and `*name`
    references are how a small file expands to billions of strings ("billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a suite file "
                                              "(write the entries out)", event.start_mark)
        return super().compose_node(parent, index)


def _suite_text(path: Path) -> str:
    """The suite file's text: a regular file of at most MAX_SUITE_BYTES."""
    from qbench.data.corpus import read_regular_file

    try:
        data = read_regular_file(path, MAX_SUITE_BYTES)
    except FileNotFoundError:
        raise SuiteError(f"suite file {path} does not exist") from None
    except OSError as err:
        raise SuiteError(f"suite file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SuiteError(f"suite file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _names(data: dict, key: str, path: Path) -> list[str]:
    values = data[key] if isinstance(data[key], list) else [data[key]]
    for index, value in enumerate(values):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SuiteError(f"suite file {path}: `{key}` entry {index + 1} is a {type(value).__name__}, "
                             "not a name")
    return [str(v) for v in values]


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    text = _suite_text(path)
    try:
        data = yaml.load(text, Loader=_SuiteLoader)  # noqa: S506 (a SafeLoader without aliases)
    except yaml.YAMLError as err:
        raise SuiteError(f"suite file {path} is not valid YAML: {' '.join(str(err).split())[:300]}") from err
    if not isinstance(data, dict):
        raise SuiteError(f"suite file {path} must be a mapping with keys {sorted(SUITE_KEYS)}")
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"suite file {path}: unknown key {unknown[0]!r}{closest(unknown[0], SUITE_KEYS)}")
    for key in ("models", "schemes"):
        if not data.get(key):
            raise SuiteError(f"suite file {path}: `{key}` must list at least one entry")
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    resources = {"num_cpus": 1, "num_gpus": 0, **(data.get("resources") or {})}
    bad = sorted(set(resources) - {"num_cpus", "num_gpus", "memory"})
    if bad:
        raise SuiteError(f"suite file {path}: unknown resource {bad[0]!r} (use num_cpus, num_gpus, memory)")
    from qbench.validate import UsageError, positive_int, seed_list

    try:
        suite = Suite(name=str(data.get("name", path.stem))[:200], models=_names(data, "models", path),
                      schemes=_names(data, "schemes", path),
                      tasks=_names({"tasks": data.get("tasks", ["ppl"])}, "tasks", path),
                      calibration_seeds=seed_list(as_list(data["calibration_seeds"]), "calibration_seeds")
                      if data.get("calibration_seeds") is not None else None,
                      limit=positive_int(data.get("limit"), "limit"),
                      task_limit=positive_int(data.get("task_limit"), "task_limit"), corpus=data.get("corpus"),
                      resources=resources)
    except UsageError as err:
        raise SuiteError(f"suite file {path}: {err}") from err
    return suite


@dataclass(frozen=True)
class CellSpec:
    """What a worker needs to re-plan one cell by itself (plain data, cheap to ship)."""
    key: str
    model: str
    scheme: str
    calibration_seed: int | None
    task: str
    limit: int | None
    task_limit: int | None
    corpus: str | None
    threads: int


def expand(suite: Suite) -> list[CellSpec]:
    """Every cell of the suite, keyed (models are resolved and hashed, not loaded)."""
    from qbench.bench import plan_cells

    try:
        planned = plan_cells(suite.models, suite.schemes, suite.tasks, suite.limit, suite.corpus,
                             suite.calibration_seeds, suite.task_limit)
    except KeyError as err:
        raise SuiteError(f"suite {suite.name!r}: {err.args[0] if err.args else err}") from err
    threads = max(1, int(suite.resources.get("num_cpus", 1)))
    return [CellSpec(p.cell.key, p.cell.model, p.cell.scheme, p.cell.resolved_scheme.options.get("calibration_seed"),
                     p.cell.task, suite.limit, suite.task_limit, suite.corpus, threads) for p in planned]


def run_spec(spec: CellSpec | dict, results_dir: str) -> dict:
    """Worker side: run one cell into the store (or find it there); returns a summary."""
    import torch

    spec = CellSpec(**spec) if isinstance(spec, dict) else spec
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        return _run_spec(spec, results_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _run_spec(spec: CellSpec, results_dir: str) -> dict:
    from qbench.bench import plan_cells, run_planned
    from qbench.results import ResultStore

    pid_dir = os.environ.get("QBENCH_SWEEP_PID_DIR")  # test hook: lets a test find (and kill) the worker
    if pid_dir:
        Path(pid_dir, f"{spec.key}-{os.getpid()}").write_text(str(os.getpid()))
        time.sleep(float(os.environ.get("QBENCH_SWEEP_TEST_DELAY", "0")))
    store = ResultStore(results_dir)
    existing = store.get(spec.key)
    if existing is not None:
        return {"key": spec.key, "status": existing.get("status"), "computed": False, "pid": os.getpid()}
    seeds = [spec.calibration_seed] if spec.calibration_seed is not None else None
    [planned] = [p for p in plan_cells([spec.model], [spec.scheme], [spec.task], spec.limit, spec.corpus, seeds,
                                       spec.task_limit) if p.cell.key == spec.key] or [None]
    if planned is None:
        from qbench.zoo import CheckpointError

        raise CheckpointError(f"cell {spec.key} ({spec.model} {spec.scheme} {spec.task}) no longer matches its "
                              "model or data (changed since the sweep was planned); re-run the sweep to re-plan it")
    record = run_planned(planned, store)
    return {"key": spec.key, "status": record.get("status"), "computed": True, "pid": os.getpid()}


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
    import signal

    # the process list first: shutdown() drops the executor's reference to it
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.time() + 5
    for process in processes:
        process.join(max(0.0, deadline - time.time()))
        if process.is_alive():
            process.kill()


def _pool_run(spec: dict, results_dir: str, running_dir: str) -> dict:
    """Worker side of the local pool: note which cell this process runs (so the parent can
    tell, when a worker dies, which cell died with it), then run it."""
    Path(running_dir, str(os.getpid())).write_text(spec["key"])
    return run_spec(spec, results_dir)


def _died_with(processes: list, running_dir: Path) -> dict[str, str]:
    """{key: why} for the cells whose worker died on its own (killed, crashed, out of
    memory); the pool's own SIGTERM of the other workers after a death is not counted."""
    import signal

    def why(code):
        return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"

    notes = {p: running_dir / str(p.pid) for p in processes if (running_dir / str(p.pid)).exists()}
    dead = {note.read_text(): why(p.exitcode) for p, note in notes.items()
            if p.exitcode not in (None, 0, -signal.SIGTERM)}
    # no worker died on its own (all SIGTERMed from outside): every running cell is charged,
    # so a cell that keeps killing its worker cannot loop for ever
    return dead or {note.read_text(): why(p.exitcode) for p, note in notes.items() if p.exitcode is not None}


def _record_dead_cell(spec: CellSpec, results_dir: str, why: str) -> dict:
    """A cell whose worker died on its retry too: recorded as failed, with the reason."""
    from qbench.bench import failed_record, plan_cells
    from qbench.results import ResultStore

    store = ResultStore(results_dir)
    if (existing := store.get(spec.key)) is not None:  # it landed after all (died after the write)
        return {"key": spec.key, "status": existing.get("status"), "computed": False, "pid": None}
    seeds = [spec.calibration_seed] if spec.calibration_seed is not None else None
    planned = [p for p in plan_cells([spec.model], [spec.scheme], [spec.task], spec.limit, spec.corpus, seeds,
                                     spec.task_limit) if p.cell.key == spec.key]
    if planned:
        store.put(failed_record(planned[0], f"WorkerDied: the worker running this cell died twice ({why}); "
                                            "`qbench bench --force` on it tries again"))
    return {"key": spec.key, "status": "failed", "computed": True, "pid": None}


def run_local(specs: list[CellSpec], results_dir: str, workers: int = 1, progress: bool = True,
              retries: int = 1) -> list[dict]:
    """Run the cells here (workers <= 1) or in `workers` spawned processes.  A worker that
    dies (killed, out of memory) loses only its cell: the pool is rebuilt, the other cells
    it was running go back to the queue, and the cell is retried `retries` times, then
    recorded as failed.  A cell that raises (its checkpoint changed under the sweep) is
    skipped with a warning; its error is raised once every other cell has run.  Ctrl-C
    stops at once: no new cell starts, running cells are abandoned (nothing partial is
    recorded), and KeyboardInterrupt reaches the caller (exit 130); workers never outlive
    this process."""
    from tqdm.auto import tqdm

    if workers <= 1:
        return [run_spec(s, results_dir) for s in tqdm(specs, desc="cells", disable=not progress)]
    import multiprocessing as mp
    import shutil
    import signal
    import sys
    import tempfile
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    out = []
    interrupted = []

    def on_sigint(signum, frame):  # whatever the pool raises after Ctrl-C, the caller sees the interrupt
        interrupted.append(signum)
        raise KeyboardInterrupt

    def new_pool():
        return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))

    running_dir = Path(tempfile.mkdtemp(prefix="qbench-sweep-"))
    deaths: dict[str, int] = {}
    errors: list[Exception] = []
    previous = signal.signal(signal.SIGINT, on_sigint)
    pool = new_pool()
    try:
        pending = {pool.submit(_pool_run, asdict(s), results_dir, str(running_dir)): s for s in specs}
        bar = tqdm(total=len(pending), desc="cells", disable=not progress)
        while pending:  # short waits: the main thread gets to run the Ctrl-C handler promptly
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            lost = []
            for future in finished:
                spec = pending.pop(future)
                try:
                    out.append(future.result())
                except BrokenProcessPool:
                    lost.append(spec)
                    continue
                except Exception as err:  # the cell raised (a checkpoint changed under it): the others go on
                    errors.append(err)
                    print(f"qbench sweep: warning: {spec.model} {spec.scheme} {spec.task} not run: "
                          f"{' '.join(str(err).split())[:300]}", file=sys.stderr)
                bar.update(1)
            if not lost:
                continue
            # a worker died: every cell still queued on this pool is lost with it; rebuild
            processes = list((getattr(pool, "_processes", None) or {}).values())
            lost += list(pending.values())
            _stop_workers(pool)
            died = _died_with(processes, running_dir)
            for child in running_dir.iterdir():
                child.unlink(missing_ok=True)
            pool, pending = new_pool(), {}
            for spec in lost:
                if spec.key in died:
                    deaths[spec.key] = deaths.get(spec.key, 0) + 1
                    print(f"qbench sweep: warning: the worker running {spec.model} {spec.scheme} {spec.task} died "
                          f"({died[spec.key]}); " + ("retrying it" if deaths[spec.key] <= retries
                                                     else "recording it as failed"), file=sys.stderr)
                    if deaths[spec.key] > retries:
                        out.append(_record_dead_cell(spec, results_dir, died[spec.key]))
                        bar.update(1)
                        continue
                pending[pool.submit(_pool_run, asdict(spec), results_dir, str(running_dir))] = spec
        bar.close()
    except BaseException:
        _stop_workers(pool)
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        shutil.rmtree(running_dir, ignore_errors=True)
    pool.shutdown(wait=True)
    if errors:  # after every other cell ran: the first error, whose type gives the exit code
        raise errors[0]
    return out


def run_ray(specs: list[CellSpec], results_dir: str, address: str | None = None, resources: dict | None = None,
            max_retries: int = 3, progress: bool = True) -> list[dict]:
    """One Ray task per cell.  `address`: an existing cluster ("auto", "ray://host:10001" or
    "host:6379"); None starts a local one for this sweep.  The result store must be a
    path every node can write (a shared file system on a multi-node cluster)."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("the ray executor needs the `ray` package: pip install 'ray==2.60.0'") from err
    from tqdm.auto import tqdm

    resources = {"num_cpus": 1, "num_gpus": 0, **(resources or {})}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith(("QBENCH_", "HF_")) or k == "TOKENIZERS_PARALLELISM"}})
    try:
        task = ray.remote(max_retries=max_retries, retry_exceptions=False, **resources)(run_spec)
        results_dir = str(Path(results_dir).resolve())
        pending = {task.remote(asdict(s), results_dir): s for s in specs}
        out, failures = [], []
        bar = tqdm(total=len(pending), desc="cells (ray)", disable=not progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            try:
                out.append(ray.get(done[0]))
            except Exception as err:  # the cell failed on every attempt
                failures.append(f"{spec.model} {spec.scheme} {spec.task}: {type(err).__name__}: {err}")
            bar.update(1)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
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
    specs = expand(suite)
    missing = [s for s in specs if store.get(s.key) is None]
    start = time.time()
    if executor == "local":
        run_local(missing, results_dir, workers, progress)
    else:
        run_ray(missing, results_dir, address, suite.resources, progress=progress)
    # counted from the store, not from what workers said (a worker that found a record
    # another process had just written is not a computation of this sweep)
    now = [store.get(s.key) for s in missing]
    summary = {"cells": len(specs), "already_recorded": len(specs) - len(missing),
               "computed": sum(1 for r in now if r is not None),
               "failed": sum(1 for r in now if r is not None and r.get("status") != "ok"),
               "seconds": round(time.time() - start, 1)}
    if any(r is None for r in now):
        summary["not_recorded"] = sum(1 for r in now if r is None)
    return summary
