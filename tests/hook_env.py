"""The environment of a process that should run the test hooks (tests/hooks/sitecustomize.py):
that folder first on PYTHONPATH, then the hooks' settings (QBENCH_TEST_PID_DIR, ...)."""
import os
from pathlib import Path

HOOKS = Path(__file__).parent / "hooks"


def with_test_hooks(env: dict, **settings: str) -> dict:
    paths = [str(HOOKS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(paths), **settings}
