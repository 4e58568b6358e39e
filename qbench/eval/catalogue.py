"""The task catalogue: every evaluation a cell can run is a `Task` object in one registry.

A task plans itself (the protocol it evaluates under, the `evaluation` part of the cell's
config that goes into the key, the record's one protocol string) and runs itself (model ->
metrics).  The planner, the runner, the report, the study and `qbench recheck` ask the
task; none of them branches on a task's name.

  ppl                perplexity under the model's protocol (Bigram-Backcopy models: their
                     fixed synthetic sequences)
  probes             outlier, sink and gate statistics on 64-token windows of the same text
  qbench_blimp       BLiMP through lm-eval
  qbench_cloze, ...  held-out sotu tasks through lm-eval (qbench.eval.heldout_tasks)
  anything else      an lm-eval task name, passed through (`LmEvalTask`)

Adding a native task is one module: a `Task` subclass and `register(MyTask())`.  Torch and
the evaluators are imported when a task runs, not here: the report reads this catalogue."""
from __future__ import annotations

import functools

from qbench.eval import heldout_tasks
from qbench.suggest import closest

BLIMP_ITEMS_PER_SUBTASK = 20
PROBE_WINDOW = 64  # Gu et al.'s sink rate is defined at a fixed T = 64
PROBE_SEQUENCES = 64


class Task:
    """One evaluation.  `native`: runs in qbench on the model's own protocol (False: through
    lm-eval, on text: never planned for a Bigram-Backcopy model).  `report_columns`: metric ->
    column of the report's comparison table.  `checked_metrics`: what `qbench recheck` holds
    to tolerance (empty: the task is not rechecked)."""
    name: str = ""
    description: str = ""
    native: bool = True
    report_columns: dict[str, str] = {}
    checked_metrics: tuple[str, ...] = ()

    def check(self) -> None:
        """Fail now, with what is missing, if the task cannot run here."""

    def protocol(self, model_protocol):
        """The protocol this task evaluates under, given the model's perplexity protocol."""
        return model_protocol

    def evaluation(self, protocol, task_limit: int | None) -> dict:
        """The `evaluation` part of the cell's config (hashed into the key)."""
        return {"task": self.name, "protocol": protocol.to_dict()}

    def record_protocol(self, protocol, evaluation: dict) -> str:
        """The record's one protocol string."""
        return protocol.id

    def run(self, model, tokenizer, protocol, evaluation: dict, reference=None, progress: bool = False) -> dict:
        """The record's metrics.  `reference`: the fp32 outputs to compare against (None for
        the fp32 cell of a native task)."""
        raise NotImplementedError(f"task {self.name!r} does not run")


def record_metrics(metrics: dict) -> dict:
    """An evaluator's metrics as a record holds them: the protocol string is the record's
    (top level, not repeated here) and the hash of the scored data is named as such."""
    metrics = {k: v for k, v in metrics.items() if k != "protocol"}
    if "data_hash" in metrics:
        metrics["scored_data_hash"] = metrics.pop("data_hash")
    return metrics


class PerplexityTask(Task):
    name = "ppl"
    description = "perplexity under the model's protocol (token, word and byte level)"
    checked_metrics = ("ppl", "word_ppl", "byte_ppl")

    def run(self, model, tokenizer, protocol, evaluation, reference=None, progress=False):
        from qbench.eval.perplexity import evaluate_perplexity

        return record_metrics(evaluate_perplexity(model, tokenizer, protocol, progress=progress, reference=reference))


class ProbesTask(Task):
    name = "probes"
    description = "activation outliers, attention sinks (T=64), value/residual drains, gate diagnostics"
    report_columns = {"max_inf_norm": "max_inf_norm", "kurtosis_mean": "kurtosis", "sink_rate@0.3": "sink_rate@0.3",
                      "first_token_share_mean": "first_token_share"}
    checked_metrics = ("max_inf_norm", "kurtosis_mean", "kurtosis_max", "first_token_share_mean")

    def protocol(self, model_protocol):
        """Whole 64-token windows of the same text, whatever the perplexity protocol."""
        from dataclasses import replace

        kind = model_protocol.kind if model_protocol.synthetic else "nonoverlap"
        return replace(model_protocol, kind=kind, window=PROBE_WINDOW, sequences=PROBE_SEQUENCES, stride=None,
                       score_from=None)

    def run(self, model, tokenizer, protocol, evaluation, reference=None, progress=False):
        from qbench.eval.perplexity import protocol_windows
        from qbench.probes import run_probes

        windows, _, scored_hash = protocol_windows(protocol, tokenizer)
        windows = [w for w in windows if len(w) == protocol.window][:PROBE_SEQUENCES]
        return {"windows": len(windows), "scored_data_hash": scored_hash,
                **run_probes(model, windows, progress=progress)}


class LmEvalTask(Task):
    """A task lm-eval runs: any name lm-eval knows (its dataset must be in the local cache)."""
    native = False

    def __init__(self, name: str, description: str = "an lm-eval task, passed through"):
        self.name, self.description = name, description

    def check(self) -> None:
        known = _lm_eval_task_names()
        if self.name not in known:
            raise KeyError(f"unknown task {self.name!r} (neither a qbench task nor an lm-eval task)"
                           f"{closest(self.name, list(_REGISTRY) + list(known))}")

    def spec(self, task_limit: int | None) -> dict:
        """What the cell runs: task configs or names, the item limit, a protocol id and a hash
        of the items (part of the key)."""
        return {"tasks": [self.name], "limit": task_limit,
                "protocol": f"lm-eval-{self.name}" + (f"-first{task_limit}" if task_limit else ""), "items_hash": None}

    def evaluation(self, protocol, task_limit):
        spec = self.spec(task_limit)
        return {"task": self.name, "protocol": spec["protocol"], "items_hash": spec["items_hash"],
                "limit": spec["limit"]}

    def record_protocol(self, protocol, evaluation):
        return evaluation["protocol"]

    def run(self, model, tokenizer, protocol, evaluation, reference=None, progress=False):
        from qbench.eval.lm_eval_tasks import TaskDataError, run_lm_eval, task_metrics

        spec = self.spec(evaluation.get("limit"))
        planned = evaluation.get("items_hash")
        if planned is not None and spec["items_hash"] != planned:
            raise TaskDataError(f"task {self.name}: its items changed after the cell was planned (items hash "
                                f"{spec['items_hash']}, planned {planned}); run the command again")

        def run(m):
            return run_lm_eval(m, tokenizer, spec["tasks"], limit=spec["limit"])

        key = {k: v for k, v in spec.items() if k != "tasks"} | {"task": self.name}
        if reference is not None and model is reference.model:  # the fp32 cell fills the cache
            return {"items_hash": spec["items_hash"], **task_metrics(reference.task_outputs(key, run), None)}
        quantized = run(model)
        fp = reference.task_outputs(key, run) if reference is not None else None
        return {"items_hash": spec["items_hash"], **task_metrics(quantized, fp)}


class BlimpTask(LmEvalTask):
    """BLiMP, one lm-eval subtask per file; `--task-limit`: items per subtask."""

    def check(self) -> None:
        from qbench.eval.lm_eval_tasks import blimp_task_configs

        blimp_task_configs()  # fails now, with the folder it looked in, if there is no data

    def spec(self, task_limit):
        from qbench.eval.lm_eval_tasks import blimp_task_configs, files_hash

        configs = blimp_task_configs()
        per = task_limit or BLIMP_ITEMS_PER_SUBTASK
        return {"tasks": configs, "limit": per, "protocol": f"lm-eval-blimp-{len(configs)}x{per}",
                "items_hash": files_hash(configs)}


class HeldoutTask(LmEvalTask):
    """A task built from held-out sotu passages (qbench.eval.heldout_tasks), run by lm-eval."""

    def check(self) -> None:
        pass  # its items are built from the corpus on first use

    def spec(self, task_limit):
        n = len(heldout_tasks.load_items(self.name))
        used = min(n, task_limit) if task_limit else n
        return {"tasks": [self.name], "limit": task_limit,
                "protocol": f"lm-eval-{self.name}-v{heldout_tasks.BUILDER_VERSION}-sotu-heldout-n{used}",
                "items_hash": heldout_tasks.items_hash(self.name)}


@functools.lru_cache(maxsize=1)
def _lm_eval_task_names() -> frozenset:
    from lm_eval.tasks import TaskManager

    from qbench.eval.lm_eval_tasks import QBENCH_TASKS_DIR

    return frozenset(TaskManager(include_path=str(QBENCH_TASKS_DIR)).all_tasks)


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the catalogue under its name (a name registered twice is a mistake)."""
    if not task.name or task.name in _REGISTRY:
        raise ValueError(f"task name {task.name!r} is empty or registered already")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task (tests that register a dummy one)."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Task]:
    """The tasks qbench defines, by name (`qbench list tasks`)."""
    return dict(_REGISTRY)


def get_task(name: str) -> Task:
    """The registered task, else lm-eval's task of that name (checked by `check_tasks`)."""
    return _REGISTRY.get(name) or LmEvalTask(name)


def native_tasks() -> list[Task]:
    return [task for task in _REGISTRY.values() if task.native]


def is_native(name: str) -> bool:
    return get_task(name).native


def check_tasks(names: list[str]) -> None:
    """Every task can run here; an unknown name fails with the closest known one."""
    for name in names:
        get_task(name).check()


register(PerplexityTask())
register(ProbesTask())
register(BlimpTask("qbench_blimp", "BLiMP minimal pairs through lm-eval (one subtask per file): accuracy, flip "
                                   "rate, recovery"))
for _name, _text in heldout_tasks.DESCRIPTIONS.items():
    register(HeldoutTask(_name, _text))
