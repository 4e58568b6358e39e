"""`qbench recheck`: recompute a random sample of stored cells and print each one's drift
against the record, next to the tolerance that applies to it.

Why records drift (REFERENCE.md section 10): the same code, libraries and keys give
different last bits when a different CPU kernel runs.  PyTorch and oneDNN pick AVX2 or
AVX-512 code paths at run time; the summation order of every matmul and reduction follows
the path (and the thread count), and a quantizer turns a last-bit change of a value that
sits on a rounding boundary into a whole quantization step.  So:

- same ISA level and thread count as the record: the same kernels ran, the cell must
  reproduce to float32 round-off, SAME_KERNELS_TOLERANCE;
- another (or an unrecorded) ISA level or thread count: CROSS_KERNEL_TOLERANCE, derived
  below from float32 and the models' sizes.

Drift is relative, |recomputed - recorded| / |recorded|, on each task's checked metrics (Task.checked_metrics).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from qbench.eval.catalogue import get_task, is_native, native_tasks
from qbench.results import ResultStore

FLOAT32_EPS = 2.0 ** -23  # 1.19e-7: one unit in the last place of a float32 near 1
# The same kernels in the same order give the same bits; 8 ulp leaves room for nothing but
# library-internal nondeterminism (none is expected on one thread).
SAME_KERNELS_TOLERANCE = 8 * FLOAT32_EPS  # 9.5e-7
# Another summation order: each dot product of length K moves by about eps * sqrt(K) of its
# magnitude (random-walk rounding), K up to 1,536 here (SmolLM2's MLP), so ~4.7e-6 per
# matmul; errors of the ~4 matmuls per layer add over up to 30 layers: ~5.6e-4 at worst in
# one logit, and perplexity averages thousands of positions, which shrinks it.  A quantizer
# can turn a moved value into a whole step when the value sits on a rounding boundary, and
# that is what bounds it from below: measured cross-ISA drift reaches 7.4e-5 (REFERENCE.md
# section 10).  The tolerance is the per-layer bound over 30 layers: eps * sqrt(1536) * 4 * 30.
CROSS_KERNEL_TOLERANCE = FLOAT32_EPS * math.sqrt(1536) * 4 * 30  # 5.6e-4


def kernel_identity() -> dict:
    """What decides which kernels run here: the ISA level PyTorch dispatches to and the
    thread count (also written into every new record's provenance.machine)."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def tolerance(record: dict, here: dict | None = None) -> tuple[float, str]:
    """(tolerance, why) for one record recomputed on this machine: the kernel rule below,
    raised to the cell's own arithmetic sensitivity where `qbench sensitivity` measured it
    (a chaotic cell moves by more than any float32 bound; qbench/sensitivity.py)."""
    tol, why = _kernel_tolerance(record, here)
    own = relative_sensitivity(record)
    if own is not None and own > tol:
        return own, f"the cell's sensitivity ({record['sensitivity'].get('perturbation')}); {why}"
    return tol, why


SENSITIVITY_METRICS = ("ppl", "word_ppl", "byte_ppl")


def relative_sensitivity(record: dict) -> float | None:
    """The largest relative move |perturbed - recorded| / |recorded| over SENSITIVITY_METRICS of a
    record's stored sensitivity (`qbench sensitivity`, qbench/sensitivity.py), or None."""
    moved = (record.get("sensitivity") or {}).get("metrics") or {}
    metrics = record.get("metrics") or {}
    values = [abs(moved[k] - metrics[k]) / abs(metrics[k]) for k in SENSITIVITY_METRICS
              if isinstance(moved.get(k), (int, float)) and isinstance(metrics.get(k), (int, float)) and metrics[k]]
    return max(values) if values else None


def cpu_kind(record: dict) -> tuple[str | None, str | None]:
    """(CPU model name, ISA level) a record was computed on (None where not recorded)."""
    machine = (record.get("provenance") or {}).get("machine") or {}
    return machine.get("cpu"), machine.get("cpu_capability")


def _cell_identity(record: dict) -> tuple:
    """What the calibration draws of one cell share: model, scheme, task, protocol."""
    return record["model"], record["scheme"], record["task"], record["protocol"]


def mixed_cells(records: list[dict]) -> dict[tuple, set]:
    """Cells whose calibration draws were computed on different CPU kinds (another CPU
    model, or another recorded ISA level): their spread over draws mixes machine effects
    into the calibration spread.  -> {cell identity: {(cpu, isa), ...}}."""
    kinds: dict[tuple, set] = {}
    for r in records:
        if r.get("status") == "ok" and is_native(r.get("task")):
            kinds.setdefault(_cell_identity(r), set()).add(cpu_kind(r))
    mixed = {}
    for cell, found in kinds.items():
        names = {name for name, _ in found if name}
        levels = {level for _, level in found if level}
        if len(names) > 1 or len(levels) > 1:
            mixed[cell] = found
    return mixed


def _kernel_tolerance(record: dict, here: dict | None = None) -> tuple[float, str]:
    here = here or kernel_identity()
    machine = (record.get("provenance") or {}).get("machine") or {}
    recorded = machine.get("cpu_capability")
    if recorded is None:
        return CROSS_KERNEL_TOLERANCE, f"record has no ISA level (here {here['cpu_capability']})"
    if recorded != here["cpu_capability"] or machine.get("torch_threads") != here["torch_threads"]:
        return CROSS_KERNEL_TOLERANCE, (f"record {recorded}/{machine.get('torch_threads')} threads, here "
                                        f"{here['cpu_capability']}/{here['torch_threads']}")
    return SAME_KERNELS_TOLERANCE, f"same kernels ({recorded}, {here['torch_threads']} thread(s))"


# What is compared: each native task's `checked_metrics` (qbench.eval.catalogue): the
# perplexities (one NLL, three normalisations) of a ppl cell, the outlier statistics of a
# probes cell.  Divergences from fp32 (KL, top-1) are differences of two nearly equal models:
# their relative drift is that of a small difference, so they are printed by `--verbose`
# callers but not held to the tolerance.


def drift(recorded: dict, recomputed: dict) -> tuple[float, str]:
    """(largest relative drift, the metric it is on) over the checked metrics both hold."""
    worst, name = 0.0, "-"
    old_metrics, new_metrics = recorded.get("metrics") or {}, recomputed.get("metrics") or {}
    for key in get_task(str(recorded.get("task"))).checked_metrics or ("ppl",):
        old, new = old_metrics.get(key), new_metrics.get(key)
        if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
            continue
        value = abs(new - old) / max(abs(old), 1e-12)
        if math.isnan(value) or value >= worst:
            worst, name = (math.inf if math.isnan(value) else value), key
    return worst, name


@dataclass
class Recheck:
    key: str
    model: str
    scheme: str
    task: str
    calibration_seed: int | None
    recorded_ppl: float | None
    recomputed_ppl: float | None
    drift: float
    metric: str
    tolerance: float
    why: str
    seconds: float
    status: str  # ok | DRIFT | MIXED (its cell's draws ran on different CPU kinds) | unplannable | failed

    def line(self) -> str:
        draw = "" if self.calibration_seed is None else f" draw {self.calibration_seed}"
        ppl = (f"ppl {self.recorded_ppl:.6f} -> {self.recomputed_ppl:.6f}"
               if self.recorded_ppl is not None and self.recomputed_ppl is not None else "ppl -")
        return (f"{self.status:11s} {self.model} {self.scheme}{draw} {self.task}: {ppl}; drift {self.drift:.2e} "
                f"({self.metric}) vs tolerance {self.tolerance:.1e} [{self.why}] {self.seconds:.0f}s")


def default_tasks() -> tuple[str, ...]:
    """What is rechecked unless asked otherwise: every native task that names the metrics it
    holds to tolerance (lm-eval tasks take minutes a cell and are rechecked on request)."""
    return tuple(task.name for task in native_tasks() if task.checked_metrics)


def sample(records: list[dict], n: int, seed: int = 0, tasks=None, models: list[str] | None = None,
           slow: bool = False) -> list[dict]:
    """`n` records drawn at random (reproducibly, by `seed`) among the ok records of `tasks`
    (default: `default_tasks()`)."""
    tasks = default_tasks() if tasks is None else tasks
    pool = [r for r in records if r.get("status") == "ok" and r.get("task") in tasks
            and (models is None or r["model"] in models)
            and (slow or not is_slow(r["scheme"]))]
    pool.sort(key=lambda r: r["key"])
    return random.Random(seed).sample(pool, min(n, len(pool)))


def is_slow(scheme_name: str) -> bool:
    """Cells that take minutes each (calibrated 4-bit searches, the quanto path), sampled only
    on request: what the scheme's handlers declare (qbench.quant.scheme.scheme_info).  A
    scheme no longer registered cannot be replanned anyway: not slow."""
    from qbench.quant.scheme import SCHEMES, scheme_info

    scheme = SCHEMES.get(scheme_name)
    return scheme is not None and scheme_info(scheme).slow


def replan(record: dict):
    """The planned cell whose key is the record's, or None (the key moved: a stale record)."""
    from qbench.plan import plan_cells

    config = record["config"]
    protocol = config["evaluation"].get("protocol") or {}
    calibration = (config.get("seeds") or {}).get("calibration")
    planned = plan_cells([record["model"]], [record["scheme"]], [record["task"]],
                         limit=protocol.get("max_chars") if isinstance(protocol, dict) else None,
                         calibration_seeds=[calibration] if calibration is not None else None,
                         task_limit=config["evaluation"].get("limit"))
    return next((p for p in planned if p.cell.key == record["key"]), None)


def recheck_record(record: dict, here: dict | None = None) -> Recheck:
    from qbench.runner import run_cell

    start = time.time()
    tol, why = tolerance(record, here)
    base = dict(key=record["key"], model=record["model"], scheme=record["scheme"], task=record["task"],
                calibration_seed=record.get("calibration_seed"),
                recorded_ppl=(record.get("metrics") or {}).get("ppl"), tolerance=tol, why=why)
    planned = replan(record)
    if planned is None:
        return Recheck(**base, recomputed_ppl=None, drift=math.inf, metric="key", seconds=time.time() - start,
                       status="unplannable")
    fresh = run_cell(planned.model_ref.load(), planned, progress=False)
    if fresh.get("status") != "ok":
        return Recheck(**base, recomputed_ppl=None, drift=math.inf, metric=str(fresh.get("error"))[:60],
                       seconds=time.time() - start, status="failed")
    value, metric = drift(record, fresh)
    return Recheck(**base, recomputed_ppl=(fresh.get("metrics") or {}).get("ppl"), drift=value, metric=metric,
                   seconds=time.time() - start, status="ok" if value <= tol else "DRIFT")


def run_recheck(store: ResultStore, n: int, seed: int = 0, tasks=None, models: list[str] | None = None,
                slow: bool = False, echo=print) -> list[Recheck]:
    here = kernel_identity()
    records = store.records()
    chosen = sample(records, n, seed, tasks, models, slow)
    mixed = mixed_cells(records)
    if mixed:
        echo(f"{len(mixed)} cell(s) in the store mix CPU kinds over their calibration draws")
    echo(f"rechecking {len(chosen)} of {len(store.records())} records (seed {seed}) on "
         f"{here['cpu_capability']}, {here['torch_threads']} thread(s); tolerances: same kernels "
         f"{SAME_KERNELS_TOLERANCE:.1e}, other kernels {CROSS_KERNEL_TOLERANCE:.1e} (relative)")
    results = []
    for record in chosen:
        result = recheck_record(record, here)
        kinds = mixed.get(_cell_identity(record))
        if kinds and result.status == "ok":
            result.status = "MIXED"
            result.why += "; draws on " + " and ".join(sorted(f"{c}/{i or '?'}" for c, i in kinds))
        echo(result.line())
        results.append(result)
    bad = [r for r in results if r.status != "ok"]
    echo(f"{len(results) - len(bad)} of {len(results)} within tolerance"
         + (f"; {len(bad)} not: recompute them with `qbench bench ... --force` (MIXED: every draw of the "
            "cell, on one CPU kind)" if bad else ""))
    return results
