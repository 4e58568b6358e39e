"""`qbench sensitivity`: how far a stored cell moves when the same code recomputes it under
a perturbed arithmetic, stored beside the value (`record["sensitivity"]`).

Why (REFERENCE.md sections 10-11): a quantizer turns a last-bit change of a value that sits
on a rounding boundary into a whole quantization step, and some cells are chaotic in the
arithmetic: the other kernel ISA level or another thread count moves them by far more than
float32 round-off.  A difference between two arms smaller than their cells' own sensitivity
is not an effect (the study's verdict rule reads it, qbench/study/verdict.py), and `qbench
recheck` holds a cell to at least its sensitivity.

The perturbation runs in a child process, because PyTorch and oneDNN pick their kernels
when they load: `isa` = the next lower ISA level (AVX512 -> AVX2 for ATen, oneDNN and MKL);
`threads` = twice the thread count of the record.  The child replans each record's cell
(its key must match), computes it and prints one JSON line per cell; the parent writes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from qbench.recheck import SENSITIVITY_METRICS as METRICS, relative_sensitivity
from qbench.results import ResultStore

LOWER_ISA = {"AVX512": "AVX2", "AVX512_BF16": "AVX2", "AVX512_VNNI": "AVX2", "AVX2": "DEFAULT"}


def perturbed_environment(kind: str, record: dict | None = None) -> tuple[dict, str]:
    """(environment variables, description) of one perturbation of this machine's arithmetic."""
    import torch

    here = torch.backends.cpu.get_cpu_capability()
    if kind == "isa":
        lower = LOWER_ISA.get(here.upper())
        if lower is None:
            raise ValueError(f"no lower ISA level known below {here!r}; use --perturbation threads")
        env = {"ATEN_CPU_CAPABILITY": lower.lower(), "ONEDNN_MAX_CPU_ISA": lower,
               "MKL_ENABLE_INSTRUCTIONS": lower if lower != "DEFAULT" else "SSE4_2"}
        return env, f"ISA {here} -> {lower}"
    if kind == "threads":
        threads = ((record or {}).get("provenance") or {}).get("machine", {}).get("torch_threads") or 1
        return {"OMP_NUM_THREADS": str(2 * threads)}, f"threads {threads} -> {2 * threads}"
    raise ValueError(f"unknown perturbation {kind!r} (isa or threads)")


@dataclass
class Measured:
    key: str
    model: str
    scheme: str
    calibration_seed: int | None
    relative: float | None
    status: str

    def line(self) -> str:
        draw = "" if self.calibration_seed is None else f" draw {self.calibration_seed}"
        move = "-" if self.relative is None else f"{self.relative:.2e}"
        return f"{self.status:8s} {self.model} {self.scheme}{draw}: relative move {move}"


def _child(keys: list[str], results: str) -> int:
    """In the perturbed process: recompute each key's cell, print one JSON line each."""
    from qbench.runner import run_cell
    from qbench.recheck import kernel_identity, replan

    store = ResultStore(results)
    loaded: dict = {}
    for key in keys:
        record = store.get(key)
        planned = replan(record) if record else None
        if planned is None:
            print(json.dumps({"key": key, "error": "unplannable"}), flush=True)
            continue
        name = planned.model_ref.name
        if name not in loaded:
            loaded.clear()
            loaded[name] = planned.model_ref.load()
        fresh = run_cell(loaded[name], planned, progress=False)
        metrics = {k: (fresh.get("metrics") or {}).get(k) for k in METRICS}
        print(json.dumps({"key": key, "status": fresh.get("status"), "metrics": metrics,
                          "kernels": kernel_identity()}), flush=True)
    return 0


def measure(store: ResultStore, records: list[dict], kind: str = "isa", force: bool = False,
            echo=print) -> list[Measured]:
    """Recompute `records` (ppl cells) under the perturbation and store each one's move as
    the child reports it (an interrupted run keeps what it measured)."""
    todo = {r["key"]: r for r in records if r.get("task") == "ppl" and r.get("status") == "ok"
            and (force or not r.get("sensitivity"))}
    if not todo:
        return []
    env, what = perturbed_environment(kind, next(iter(todo.values())))
    echo(f"sensitivity of {len(todo)} cell(s) under {what}")
    out = []
    with subprocess.Popen([sys.executable, "-m", "qbench.sensitivity", "--child", str(store.root), *todo],
                          env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as child:
        for line in child.stdout:
            if not line.startswith("{"):
                continue
            found = json.loads(line)
            record = todo.pop(found["key"], None)
            if record is None:
                continue
            if found.get("status") == "ok":
                with store.lock(record["key"]):
                    record = store.get(record["key"]) or record
                    record["sensitivity"] = {"perturbation": what, "kernels": found["kernels"],
                                             "metrics": found["metrics"]}
                    store.put(record)
            result = Measured(record["key"], record["model"], record["scheme"], record.get("calibration_seed"),
                              relative_sensitivity(record) if found.get("status") == "ok" else None,
                              "ok" if found.get("status") == "ok" else "failed")
            echo(result.line())
            out.append(result)
    for record in todo.values():  # the child stopped before these
        out.append(Measured(record["key"], record["model"], record["scheme"], record.get("calibration_seed"),
                            None, "failed"))
    return out


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--child":
    sys.exit(_child(sys.argv[3:], sys.argv[2]))
