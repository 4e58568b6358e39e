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


def run_lm_eval(model, tokenizer, task_configs: list[dict], limit: int | None = None,
                batch_size: int = 16) -> dict:
    """Accuracy per subtask and each item's prediction (index of the highest log-likelihood)."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=task_configs, limit=limit, log_samples=True, verbosity="ERROR")
    results, predictions, loglikelihoods = {}, {}, {}
    for config in task_configs:
        name = config["task"]
        results[name] = out["results"][name]["acc,none"]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        loglikelihoods[name] = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        predictions[name] = [max(range(len(ll)), key=ll.__getitem__) for ll in loglikelihoods[name]]
    return {"accuracy_per_task": results, "predictions": predictions, "loglikelihoods": loglikelihoods}


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
    items = [p for preds in quantized["predictions"].values() for p in preds]
    metrics = {"accuracy": sum(p == 0 for p in items) / len(items), "items": len(items),
               "accuracy_per_task": quantized["accuracy_per_task"]}
    if reference is not None:
        ref_items = [p for preds in reference["predictions"].values() for p in preds]
        fp_accuracy = sum(p == 0 for p in ref_items) / len(ref_items)
        metrics["fp_accuracy"] = fp_accuracy
        metrics["flip_rate"] = sum(a != b for a, b in zip(items, ref_items)) / len(items)
        metrics["recovery"] = metrics["accuracy"] / fp_accuracy if fp_accuracy else None
    return metrics
