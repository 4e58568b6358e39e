"""The runner: one planned cell (qbench.plan) -> one result record.  `run_cells` walks
planned cells, skipping those already in the store, so an interrupted run resumes where
it stopped and loses at most the cell in flight; `run_bench` plans a grid and runs it."""
from __future__ import annotations

import copy
import resource
import time
import traceback

from tqdm.auto import tqdm

from qbench.data.calibration import calibration_source
from qbench.eval import PerplexityProtocol, evaluate_perplexity
from qbench.eval.lm_eval_tasks import run_lm_eval, task_metrics
from qbench.eval.perplexity import protocol_windows
from qbench.eval.protocols import PROBE_SEQUENCES, is_lm_eval_task, lm_eval_spec
from qbench.eval.reference import FPReference
from qbench.plan import PlannedCell, cell_facts, last_uses, plan_cells
from qbench.probes import run_probes
from qbench.quant import quantize
from qbench.results import ResultStore, git_sha, library_versions, machine, validate_record
from qbench.zoo import LoadedModel


def evaluate_task(model, tokenizer, task: str, protocol: PerplexityProtocol, progress: bool,
                  reference: FPReference | None = None, task_limit: int | None = None,
                  planned_items_hash: str | None = None) -> dict:
    if task == "ppl":
        return evaluate_perplexity(model, tokenizer, protocol, progress=progress, reference=reference)
    if is_lm_eval_task(task):
        spec = lm_eval_spec(task, task_limit)
        if planned_items_hash is not None and spec["items_hash"] != planned_items_hash:
            from qbench.eval.lm_eval_tasks import TaskDataError

            raise TaskDataError(f"task {task}: its items changed after the cell was planned (items hash "
                                f"{spec['items_hash']}, planned {planned_items_hash}); run the command again")

        def run(m):
            return run_lm_eval(m, tokenizer, spec["tasks"], limit=spec["limit"])

        key = {k: v for k, v in spec.items() if k != "tasks"} | {"task": task}
        if reference is not None and model is reference.model:  # the fp32 cell fills the cache
            return {"protocol": spec["protocol"], "items_hash": spec["items_hash"],
                    **task_metrics(reference.task_outputs(key, run), None)}
        quantized = run(model)
        fp = reference.task_outputs(key, run) if reference is not None else None
        return {"protocol": spec["protocol"], "items_hash": spec["items_hash"], **task_metrics(quantized, fp)}
    windows, _, data_hash = protocol_windows(protocol, tokenizer)
    windows = [w for w in windows if len(w) == protocol.window][:PROBE_SEQUENCES]
    return {"protocol": f"probes-n{len(windows)}-{protocol.id}", "data_hash": data_hash,
            **run_probes(model, windows, progress=progress)}


def _record_head(planned: PlannedCell) -> dict:
    cell, protocol = planned.cell, planned.protocol
    return {"key": cell.key, "config": cell.config, "model": cell.model, "scheme": cell.scheme.name,
            "task": cell.task, "protocol": cell.config["evaluation"].get("protocol", protocol.id)
            if is_lm_eval_task(cell.task) else protocol.id,
            "calibration_seed": cell.scheme.options.get("calibration_seed"),
            "facts": cell_facts(planned.model_ref, cell.scheme)}


def failed_record(planned: PlannedCell, error: str) -> dict:
    """The record of a cell that could not run to the end (its worker died twice): failed,
    with the reason, so the sweep finishes and a rerun does not loop on it."""
    return {**_record_head(planned), "status": "failed", "error": error,
            "provenance": {"libraries": library_versions(), "git_sha": git_sha(), "machine": machine(),
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}


def run_cell(loaded: LoadedModel, planned: PlannedCell, progress: bool, device=None) -> dict:
    """Quantize a copy of the model and evaluate it on `device` (default cpu); failures
    become failed records.  The device is provenance, not part of the key."""
    import torch

    from qbench.device import device_name, place

    device = torch.device(device or "cpu")
    place(loaded.model, device)
    cell, protocol, scheme = planned.cell, planned.protocol, planned.cell.scheme
    start = time.time()
    record = _record_head(planned)
    try:
        in_place = scheme.backend == "reference" and scheme.dtype == "float32" and not scheme.options
        model = loaded.model if in_place else copy.deepcopy(loaded.model)  # fp32 evaluates the loaded model
        calibration = calibration_source(protocol.corpus, loaded.tokenizer, protocol.window,
                                         bigram_backcopy=protocol.kind == "bigram_backcopy")
        record["quantization"] = quantize(model, scheme, calibration)
        # KL / top-1 / flip rate against fp32 (its outputs cached on disk, shared by all schemes)
        reference = FPReference(loaded.model, loaded.checkpoint_hash)
        if model is loaded.model and not is_lm_eval_task(cell.task):
            reference = None  # nothing to compare the fp32 row against
        record["metrics"] = evaluate_task(model, loaded.tokenizer, cell.task, protocol, progress, reference,
                                          task_limit=planned.task_limit,
                                          planned_items_hash=cell.config["evaluation"].get("items_hash"))
        record["status"] = "ok"
    except (ArithmeticError, NotImplementedError, RuntimeError, ValueError) as err:
        # ArithmeticError: NonFiniteError and any overflow in a metric, a failed cell, not a crash
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=5)
    record["provenance"] = {
        "wall_seconds": round(time.time() - start, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "libraries": library_versions(), "git_sha": git_sha(), "machine": machine(),
        "device": device_name(device),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return record


def _log_computed(key: str) -> None:
    """Test and stress hook: QBENCH_COMPUTE_LOG names a file that gets one line per cell this
    process computed and recorded (bench/stress.py counts duplicates with it)."""
    import os

    path = os.environ.get("QBENCH_COMPUTE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{key} {os.getpid()}\n")


def schema_checked(record: dict) -> dict:
    """A computed record that the store's schema would refuse (a non-finite or out-of-range
    metric) is written as a failed record with the reason, so no reader quarantines it."""
    why = validate_record(record, record["key"])
    if why is not None and record.get("status") == "ok":
        record = {**record, "status": "failed", "error": f"NonFiniteError: {why}",
                  "metrics": {k: v for k, v in record["metrics"].items() if validate_record(
                      {**record, "metrics": {k: v}, "status": "failed"}, record["key"]) is None}}
    return record


def run_planned(planned: PlannedCell, store: ResultStore, progress: bool = False, force: bool = False,
                wait: bool = True, device=None) -> dict | None:
    """Run one planned cell unless the store already holds a valid record of it.  The cell's
    lock makes concurrent processes compute it once: with `wait` a second process blocks
    until the first has written the record and then reads it; without, it returns None at
    once (the caller comes back later)."""
    key = planned.cell.key
    record = None if force else store.get(key)
    if record is not None:
        return record
    lock = store.lock(key)
    if not lock.acquire(blocking=wait):
        return None
    try:
        record = None if force else store.get(key)  # written while we waited
        if record is None and planned.refused is not None:  # refused at planning: the model never loads
            record = failed_record(planned, f"UnsupportedModel: refused at planning: {planned.refused}")
            store.put(record)
        elif record is None:
            record = run_cell(planned.model_ref.load(), planned, progress, device)
            store.put(schema_checked(record))
            _log_computed(key)
    finally:
        lock.release()
    return record


def run_bench(models: list[str], schemes: list[str], tasks: list[str], store: ResultStore,
              limit: int | None = None, force: bool = False, progress: bool = True,
              corpus: str | None = None, calibration_seeds: list[int] | None = None,
              task_limit: int | None = None, first_token: str | None = None, device=None,
              verify: bool = True, protocol=None) -> list[dict]:
    """Run every missing cell of models x schemes (x calibration seeds) x tasks in this
    process; returns all their records.  `task_limit` caps the items of each lm-eval task
    (BLiMP: fixed at BLIMP_ITEMS_PER_SUBTASK per subtask); `verify=False` accepts modified
    zoo checkpoints (plan_cells)."""
    store.check_writable()
    planned = plan_cells(models, schemes, tasks, limit, corpus, calibration_seeds, task_limit, first_token,
                         verify=verify, protocol=protocol)
    if first_token is not None:
        check_first_token(planned, first_token)
    return run_cells(planned, store, force, progress, device)


def check_first_token(planned: list[PlannedCell], first_token: str) -> None:
    """--first-token must be one token of every model's tokenizer: a usage error (exit 2)
    before any cell, not a failed record per cell."""
    from qbench.eval.perplexity import _bos_id
    from qbench.validate import UsageError

    refs = {id(p.model_ref): p.model_ref for p in planned}.values()
    for ref in refs:
        loaded = ref._loaded is not None
        try:
            _bos_id(ref.load().tokenizer, first_token)
        except ValueError as err:
            raise UsageError(f"--first-token: {err} (model {ref.name})") from None
        finally:
            if not loaded:
                ref.unload()


def run_cells(planned: list[PlannedCell], store: ResultStore, force: bool = False, progress: bool = True,
              device=None) -> list[dict]:
    """Run every planned cell the store lacks in this process; returns all their records.
    Cells another process is computing are waited for at the end."""
    if device is not None and str(device) != "cpu":  # before any model is loaded
        import torch

        from qbench.quant.handlers import check_devices

        check_devices([p.cell.scheme for p in planned], torch.device(device))
    records: dict[int, dict] = {}
    last = last_uses(planned)
    bar = tqdm(total=len(planned), desc="cells", disable=not progress)
    busy = []  # cells another process is computing: come back to them at the end
    for index, item in enumerate(planned):
        bar.set_postfix_str(f"{item.cell.model} {item.cell.scheme.name} {item.cell.task}")
        record = run_planned(item, store, progress, force, wait=False, device=device)
        if index in last:
            item.model_ref.unload()
        if record is None:
            busy.append(index)
            continue
        records[index] = record
        bar.update(1)
    for index in busy:
        bar.set_postfix_str(f"waiting for another process: {planned[index].cell.model} {planned[index].cell.scheme.name}")
        records[index] = run_planned(planned[index], store, progress, force=False, wait=True, device=device)
        bar.update(1)
    bar.close()
    return [records[i] for i in range(len(planned))]
