"""Ctrl-C while the CLI is still importing torch: one line and exit 130, like any other
interrupt (it used to be a traceback and exit 1, results/PERF.md "Robustness").  The
interrupt lands deterministically: a test-only sitecustomize on PYTHONPATH stalls the
import of torch, says so in a file, and the test sends SIGINT only then."""
import os
import signal
import subprocess
import sys
import time

from qbench.paths import REPO_ROOT

STALL = '''import importlib.abc, os, sys, time


class _StallTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            open(os.environ["QBENCH_TEST_STALLED"], "w").close()
            time.sleep(120)  # the SIGINT ends it
        return None


sys.meta_path.insert(0, _StallTorch())
'''


def _default_sigint():
    """As a shell starts a foreground command: SIGINT at its default.  A pytest-xdist worker
    ignores SIGINT, and an ignored SIGINT is inherited; Python then installs no
    KeyboardInterrupt handler at all and the signal would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_import_qbench_loads_neither_torch_nor_transformers():
    code = "import sys, qbench; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_ctrl_c_while_importing_torch_exits_130_with_one_line(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(STALL)
    stalled = tmp_path / "stalled"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}", "QBENCH_TEST_STALLED": str(stalled)}
    proc = subprocess.Popen([sys.executable, "-m", "qbench.cli", "list", "schemes"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while not stalled.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert stalled.exists(), "the CLI never imported torch"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["interrupted; completed work is kept, rerun the same command to resume"]
    assert out == ""
