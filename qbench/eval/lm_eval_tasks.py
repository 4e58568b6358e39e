"""Downstream tasks through lm-evaluation-harness, on an in-memory (quantized) model.

`qbench_blimp`: every BLiMP-format JSONL file in a directory ($QBENCH_BLIMP_DIR, else
../shared/data/blimp beside the repository), one lm-eval multiple-choice subtask per file
found: the model must give the grammatical sentence the higher log-likelihood.  Task
configs are passed to lm-eval as dicts with absolute data paths (lm-eval resolves
`data_files` against the working directory, not a YAML's folder).
"""
from __future__ import annotations

import os
from pathlib import Path

from qbench.paths import REPO_ROOT

DEFAULT_BLIMP_DIR = REPO_ROOT.parent / "shared" / "data" / "blimp"


class TaskDataError(FileNotFoundError):
    """A task's data is not on this machine (qbench never downloads it)."""


def blimp_dir() -> Path:
    return Path(os.environ.get("QBENCH_BLIMP_DIR", DEFAULT_BLIMP_DIR))


def blimp_task_configs(directory: Path | None = None) -> list[dict]:
    directory = Path(directory or blimp_dir())
    files = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    if not files:
        raise TaskDataError(f"qbench_blimp found no BLiMP .jsonl files in {directory}; "
                            "set QBENCH_BLIMP_DIR to a folder of BLiMP-format files")
    return [{
        "task": f"qbench_blimp_{path.stem}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "", "target_delimiter": "", "doc_to_target": 0,
        "doc_to_choice": "{{[sentence_good, sentence_bad]}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    } for path in files]


QBENCH_TASKS_DIR = Path(__file__).parent / "tasks"


def _task_name(task) -> str:
    return task["task"] if isinstance(task, dict) else task


def run_lm_eval(model, tokenizer, tasks: list, limit: int | None = None, batch_size: int = 16) -> dict:
    """Run lm-eval tasks (names from lm-eval's index or qbench's task folder, or dict
    configs) on an in-memory model.  Per item: the prediction (the chosen index for
    multiple-choice tasks, greedy-or-not for loglikelihood tasks), whether it is correct,
    and the log-likelihoods.  Tasks whose data is not on this machine raise TaskDataError
    (qbench sets HF_DATASETS_OFFLINE=1 unless the user set it, so nothing hangs on a network)."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names = [_task_name(t) for t in tasks]
    qbench_only = all(isinstance(t, dict) or (QBENCH_TASKS_DIR / f"{t}.yaml").exists() for t in tasks)
    # lm-eval's own index of ~15,000 tasks takes ~10-20 s to build: only when asked for one of them
    manager = TaskManager(include_path=str(QBENCH_TASKS_DIR), include_defaults=not qbench_only)
    unknown = [n for t, n in zip(tasks, names) if isinstance(t, str) and n not in manager.all_tasks]
    if unknown:
        from qbench.suggest import closest

        raise KeyError(f"unknown lm-eval task {unknown[0]!r}{closest(unknown[0], manager.all_tasks)}")
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=True, verbosity="ERROR",
                              task_manager=manager)
    except Exception as err:  # dataset loading failures surface from deep inside datasets/hub
        text = f"{type(err).__name__}: {err}"
        offline = ("offline" in text.lower() or "connect" in text.lower() or "couldn't find" in text.lower()
                   or type(err).__name__ in ("DatasetNotFoundError", "LocalEntryNotFoundError", "ConnectionError",
                                             "OfflineModeIsEnabled", "FileNotFoundError"))
        if offline:
            from qbench.online import offline_hint

            raise TaskDataError(
                f"lm-eval task(s) {', '.join(names)}: the dataset could not be loaded: "
                f"{offline_hint('HF_DATASETS_OFFLINE', 'dataset')}; or use qbench's offline tasks "
                f"(qbench list tasks). Cause: {text[:300]}") from err
        raise
    results, predictions, correct, loglikelihoods = {}, {}, {}, {}
    for name in out["samples"]:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        results[name] = out["results"][name]["acc,none"]
        lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        loglikelihoods[name] = lls
        if samples and len(samples[0]["resps"]) == 1 and isinstance(samples[0]["resps"][0][0], (list, tuple)):
            predictions[name] = [int(bool(s["resps"][0][0][1])) for s in samples]  # loglikelihood: greedy?
        else:
            predictions[name] = [max(range(len(ll)), key=ll.__getitem__) for ll in lls]
        correct[name] = [bool(s["acc"]) for s in samples]
    return {"accuracy_per_task": results, "predictions": predictions, "correct": correct,
            "loglikelihoods": loglikelihoods}


def files_hash(task_configs: list[dict]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for config in task_configs:
        path = Path(config["dataset_kwargs"]["data_files"]["test"])
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def task_metrics(quantized: dict, reference: dict | None) -> dict:
    """accuracy (mean over items of all subtasks), and against fp32 on the same items:
    flip_rate (items whose prediction changed) and recovery (accuracy / fp32 accuracy)."""
    names = list(quantized["predictions"])
    items = [p for n in names for p in quantized["predictions"][n]]
    right = [c for n in names for c in quantized["correct"][n]]
    metrics = {"accuracy": sum(right) / len(right), "items": len(items),
               "accuracy_per_task": quantized["accuracy_per_task"]}
    if reference is not None:
        ref_items = [p for n in names for p in reference["predictions"][n]]
        ref_right = [c for n in names for c in reference["correct"][n]]
        if len(ref_items) != len(items):
            raise ValueError(f"reference has {len(ref_items)} items, quantized {len(items)}")
        fp_accuracy = sum(ref_right) / len(ref_right)
        metrics["fp_accuracy"] = fp_accuracy
        metrics["flip_rate"] = sum(a != b for a, b in zip(items, ref_items)) / len(items)
        metrics["recovery"] = metrics["accuracy"] / fp_accuracy if fp_accuracy else None
    return metrics
