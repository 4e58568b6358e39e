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
from qbench.eval import NonFiniteError, PerplexityProtocol, evaluate_perplexity
from qbench.eval.lm_eval_tasks import blimp_task_configs, files_hash, run_lm_eval, task_metrics
from qbench.eval.perplexity import protocol_windows
from qbench.probes import run_probes
from qbench.quant import Scheme, get_scheme, quantize
from qbench.registry import closest
from qbench.results import ResultStore, cell_key, git_sha, library_versions, machine
from qbench.zoo import LoadedModel, ModelRef, read_zoo, resolve_model

TASKS = {
    "ppl": "perplexity under the model's protocol (token, word and byte level)",
    "probes": "activation outliers, attention sinks (T=64), value/residual drains, gate diagnostics",
    "qbench_blimp": "BLiMP minimal pairs through lm-eval (one subtask per file): accuracy, flip rate, recovery",
}
BLIMP_ITEMS_PER_SUBTASK = 20
DEFAULT_WINDOW = 256
PROBE_WINDOW = 64  # Gu et al.'s sink rate is defined at a fixed T = 64
PROBE_SEQUENCES = 64


def check_tasks(tasks: list[str]) -> None:
    for task in tasks:
        if task not in TASKS:
            raise KeyError(f"unknown task {task!r}{closest(task, TASKS)}")
        if task == "qbench_blimp":
            blimp_task_configs()  # fails now, with the folder it looked in, if there is no data


def resolve_protocol(model: ModelRef | LoadedModel, limit: int | None, corpus: str | None = None) -> PerplexityProtocol:
    """The model's own held-out data: its training corpus' test split (sotu by default),
    or fixed synthetic sequences for Bigram-Backcopy models."""
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
                              window=min(DEFAULT_WINDOW, max_positions), max_chars=limit)


def task_protocol(protocol: PerplexityProtocol, task: str) -> PerplexityProtocol:
    """The protocol a task evaluates under: probes use 64-token windows of the same text."""
    if task == "probes":
        return replace(protocol, window=PROBE_WINDOW, sequences=PROBE_SEQUENCES)
    return protocol


def evaluate_task(model, tokenizer, task: str, protocol: PerplexityProtocol, progress: bool,
                  reference=None) -> dict:
    if task == "ppl":
        return evaluate_perplexity(model, tokenizer, protocol, progress=progress, reference=reference)
    if task == "qbench_blimp":
        configs = blimp_task_configs()
        quantized = run_lm_eval(model, tokenizer, configs, limit=BLIMP_ITEMS_PER_SUBTASK)
        fp = run_lm_eval(reference, tokenizer, configs, limit=BLIMP_ITEMS_PER_SUBTASK) if reference is not None else None
        return {"protocol": f"lm-eval-blimp-{len(configs)}x{BLIMP_ITEMS_PER_SUBTASK}", **task_metrics(quantized, fp)}
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
                data_hash: str) -> dict:
    return {
        "model": {"name": ref.name, "checkpoint_hash": ref.checkpoint_hash},
        "scheme": scheme.to_json(), "scheme_hash": scheme.hash(),
        "evaluation": {"task": task, "protocol": protocol.to_dict(),
                       **({"blimp_files": files_hash(blimp_task_configs()), "items_per_subtask": BLIMP_ITEMS_PER_SUBTASK}
                          if task == "qbench_blimp" else {})},
        "data_hash": data_hash,
        "seeds": {"evaluation": protocol.seed, "calibration": scheme.options.get("calibration_seed")},
        "qbench_version": qbench.__version__,
    }


def run_cell(loaded: LoadedModel, cell: Cell, protocol: PerplexityProtocol, progress: bool) -> dict:
    """Quantize a copy of the model and evaluate it; failures become failed records."""
    scheme = cell.resolved_scheme or get_scheme(cell.scheme)
    start = time.time()
    record = {"key": cell.key, "config": cell.config, "model": cell.model, "scheme": cell.scheme,
              "task": cell.task, "protocol": protocol.id,
              "calibration_seed": scheme.options.get("calibration_seed")}
    try:
        model = loaded.model if scheme.name == "fp32" else copy.deepcopy(loaded.model)
        calibration = calibration_source(protocol.corpus, loaded.tokenizer, protocol.window,
                                         bigram_backcopy=protocol.kind == "bigram_backcopy")
        record["quantization"] = quantize(model, scheme, calibration)
        reference = None if model is loaded.model else loaded.model  # KL / top-1 against fp32
        record["metrics"] = evaluate_task(model, loaded.tokenizer, cell.task, protocol, progress, reference)
        record["status"] = "ok"
    except (NonFiniteError, NotImplementedError, RuntimeError, ValueError) as err:
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=5)
    record["provenance"] = {
        "wall_seconds": round(time.time() - start, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "libraries": library_versions(), "git_sha": git_sha(), "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return record


def expand_models(models: list[str]) -> list[str]:
    return list(read_zoo()) if models == ["all"] else models


def run_bench(models: list[str], schemes: list[str], tasks: list[str], store: ResultStore,
              limit: int | None = None, force: bool = False, progress: bool = True,
              corpus: str | None = None, calibration_seeds: list[int] | None = None) -> list[dict]:
    """Run every missing cell of models x schemes (x calibration seeds) x tasks; returns
    all their records."""
    models = expand_models(models)
    for name in schemes:
        get_scheme(name)  # fail before any work on a typo
    check_tasks(tasks)
    records = []
    variants = [v for name in schemes for v in scheme_variants(name, calibration_seeds)]
    bar = tqdm(total=len(models) * len(variants) * len(tasks), desc="cells", disable=not progress)
    for model_name in models:
        ref = resolve_model(model_name)  # weights load only if a cell is missing
        protocol = resolve_protocol(ref, limit, corpus)
        data_hash = protocol_data_hash(protocol)
        for scheme in variants:
            for task in tasks:
                cell_protocol = task_protocol(protocol, task)
                cell = Cell(model_name, scheme.name, task,
                            cell_config(ref, scheme, task, cell_protocol, data_hash), scheme)
                bar.set_postfix_str(f"{model_name} {scheme.name} {task}")
                record = None if force else store.get(cell.key)
                if record is None:
                    record = run_cell(ref.load(), cell, cell_protocol, progress)
                    store.put(record)
                records.append(record)
                bar.update(1)
    bar.close()
    return records
