"""A local-pool worker initializer for tests (the pool pickles it by reference): in the
worker, every planning entry point raises, and the worker-side entry point notes the type
of what it was handed, so a test can show that a sweep worker receives resolved cells and
plans nothing."""
import os
from pathlib import Path


def no_planning_worker(parent: int) -> None:
    import qbench.plan
    import qbench.sweep

    qbench.sweep._worker_init(parent)  # the real one: in this fresh process nothing is patched

    def refuse(*args, **kwargs):
        raise AssertionError("a sweep worker planned cells")

    for name in ("plan_cells", "plan_suite", "plan_stage", "load_suite"):
        setattr(qbench.plan, name, refuse)
        if hasattr(qbench.sweep, name):
            setattr(qbench.sweep, name, refuse)
    real = qbench.sweep.run_planned_cell

    def noting(planned, results_dir, threads=1):
        Path(os.environ["QBENCH_SWEEP_GUARD_DIR"], f"{os.getpid()}-{planned.cell.key}").write_text(
            f"{type(planned).__module__}.{type(planned).__name__}")
        return real(planned, results_dir, threads)

    qbench.sweep.run_planned_cell = noting
