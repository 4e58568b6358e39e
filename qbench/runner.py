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
from qbench.eval.catalogue import get_task
from qbench.eval.reference import FPReference
from qbench.plan import PlannedCell, cell_facts, last_uses, plan_cells
from qbench.quant import quantize
from qbench.record import Record
from qbench.results import ResultStore
from qbench.zoo import LoadedModel


def record_head(planned: PlannedCell) -> Record:
    """The record of a planned cell before it runs: its identity, config and facts."""
    cell = planned.cell
    return Record.start(key=cell.key, config=cell.config, model=cell.model, scheme=cell.scheme.name, task=cell.task,
                        protocol=get_task(cell.task).record_protocol(planned.protocol, cell.config["evaluation"]),
                        calibration_seed=cell.scheme.options.get("calibration_seed"),
                        facts=cell_facts(planned.model_ref, cell.scheme))


def failed_record(planned: PlannedCell, error: str) -> Record:
    """The record of a cell that could not run to the end (its worker died twice): failed,
    with the reason, so the sweep finishes and a rerun does not loop on it."""
    return Record.failed(record_head(planned), error)


def run_cell(loaded: LoadedModel, planned: PlannedCell, progress: bool, device=None) -> dict:
    """Quantize a copy of the model and evaluate it on `device` (default cpu); failures
    become failed records.  The device is provenance, not part of the key."""
    import torch

    from qbench.device import place

    device = torch.device(device or "cpu")
    place(loaded.model, device)
    cell, protocol, scheme = planned.cell, planned.protocol, planned.cell.scheme
    task = get_task(cell.task)
    start = time.time()
    record = record_head(planned)
    try:
        in_place = scheme.backend == "reference" and scheme.dtype == "float32" and not scheme.options
        model = loaded.model if in_place else copy.deepcopy(loaded.model)  # fp32 evaluates the loaded model
        calibration = calibration_source(protocol.corpus, loaded.tokenizer, protocol.window,
                                         bigram_backcopy=protocol.synthetic)
        record["quantization"] = quantize(model, scheme, calibration)
        # KL / top-1 / flip rate against fp32 (its outputs cached on disk, shared by all schemes)
        reference = FPReference(loaded.model, loaded.checkpoint_hash)
        if model is loaded.model and task.native:
            reference = None  # nothing to compare the fp32 row against
        record["metrics"] = task.run(model, loaded.tokenizer, protocol, cell.config["evaluation"], reference,
                                     progress)
        record["status"] = "ok"
    except (ArithmeticError, NotImplementedError, RuntimeError, ValueError) as err:
        # ArithmeticError: NonFiniteError and any overflow in a metric, a failed cell, not a crash
        return Record.failed(record, f"{type(err).__name__}: {err}", traceback.format_exc(limit=5),
                             **_costs(start, device))
    from qbench.record import provenance

    record["provenance"] = provenance(**_costs(start, device))
    return record


def _costs(start: float, device) -> dict:
    """What the cell cost and where it ran (provenance, not part of the key)."""
    from qbench.device import device_name

    return {"wall_seconds": round(time.time() - start, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "device": device_name(device)}


def run_planned(planned: PlannedCell, store: ResultStore, progress: bool = False, force: bool = False,
                wait: bool = True, device=None) -> dict | None:
    """Run one planned cell unless the store already holds a valid record of it.  The cell's
    lock makes concurrent processes compute it once: with `wait` a second process blocks
    until the first has written the record and then reads it; without, it returns None at
    once (the caller comes back later)."""
    key = planned.cell.key
    record = None if force else store.read_file(store.path(key))[0]  # silent: an invalid file is dealt with below
    if record is not None:
        return record
    lock = store.lock(key)
    if not lock.acquire(blocking=wait):
        return None
    try:
        # written while we waited; an invalid file is quarantined here, by the writer that recomputes it
        record = None if force else store.get(key, quarantine=True)
        if record is None and planned.refused is not None:  # refused at planning: the model never loads
            record = failed_record(planned, f"UnsupportedModel: refused at planning: {planned.refused}")
            store.put(record)
        elif record is None:
            record = run_cell(planned.model_ref.load(), planned, progress, device)
            store.put(record.schema_checked())
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
    (BLiMP: items per subtask, default qbench.eval.catalogue.BLIMP_ITEMS_PER_SUBTASK); `verify=False` accepts modified
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
