"""Test hooks for the qbench processes a test (or bench/stress.py) starts: tests only, never
installed.  A test that needs them puts this folder on PYTHONPATH
(tests/hook_env.py), so every Python process started with it
(the CLI, spawned sweep workers, Ray workers) runs this file at start-up; the hooks do
nothing unless one of these variables is set:

  QBENCH_TEST_PID_DIR     each sweep cell, when it starts in a worker, writes `<key>-<pid>`
                          there, so a test can find (and kill) the worker running it
  QBENCH_TEST_CELL_DELAY  then waits this many seconds before the cell runs (the window in
                          which a test stops or kills the worker)
  QBENCH_TEST_COMPUTE_LOG one line `<key> <pid>` per cell this process computed (bench/stress.py
                          and a test count cells computed twice with it)

The hooks wrap qbench.sweep._run_planned_cell and qbench.runner.run_cell once those modules
are imported (an import hook, as qbench's lm-eval startup hook does), so production code
carries none of them.  (The variables start with QBENCH_ so that a Ray sweep forwards them.)"""
import importlib.abc
import os
import sys

_TARGETS = ("qbench.sweep", "qbench.runner")


def _patch_sweep(module):
    real = module._run_planned_cell

    def _run_planned_cell(planned, results_dir):
        pid_dir = os.environ.get("QBENCH_TEST_PID_DIR")
        if pid_dir:
            import time
            from pathlib import Path

            Path(pid_dir, f"{planned.cell.key}-{os.getpid()}").write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("QBENCH_TEST_CELL_DELAY", "0")))
        return real(planned, results_dir)

    module._run_planned_cell = _run_planned_cell


def _patch_bench(module):
    real = module.run_cell

    def run_cell(loaded, planned, *args, **kwargs):
        record = real(loaded, planned, *args, **kwargs)
        path = os.environ.get("QBENCH_TEST_COMPUTE_LOG")
        if path:
            with open(path, "a") as f:
                f.write(f"{planned.cell.key} {os.getpid()}\n")
        return record

    module.run_cell = run_cell


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        (_patch_sweep if self.name == "qbench.sweep" else _patch_bench)(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


sys.meta_path.insert(0, _Finder())  # the variables are read per call: a Ray worker may get them late
