"""The one planner: (models, schemes, tasks, seeds, limits) -> fully resolved cells, and a
suite file (suites/*.yaml, the study's included) -> the same cells.

A `PlannedCell` holds everything a run needs: the model reference (checked and hashed,
not loaded), the resolved `Scheme` object (calibration seed set), the protocol and the
limits.  It is picklable, so the bench runs it here, a sweep ships it as it is to a local
worker or a Ray task, and nothing downstream looks a name up again."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

import qbench
from qbench.eval.perplexity import PerplexityProtocol
from qbench.eval.catalogue import check_tasks, get_task
from qbench.eval.protocols import ProtocolOptions, protocol_data_hash, resolve_protocol
from qbench.quant import Scheme, get_scheme
from qbench.quant.support import planning_refusal
from qbench.facts import model_facts_from_info, scheme_facts_from_json
from qbench.suggest import closest
from qbench.results import cell_key
from qbench.zoo import ModelRef, read_zoo, resolve_model

# -- cells ------------------------------------------------------------------------------------


@dataclass
class Cell:
    model: str
    scheme: Scheme  # resolved: the calibration seed of this draw is in its options
    task: str
    config: dict

    @property
    def key(self) -> str:
        return cell_key(self.config)


@dataclass
class PlannedCell:
    """A cell with everything needed to run it: picklable, so executors can ship it."""
    cell: Cell
    protocol: PerplexityProtocol
    model_ref: ModelRef
    task_limit: int | None = None
    # why the model's layout cannot take this scheme or task (qbench.quant.support), decided
    # from its config before any weights load; the runner records it as a failed cell
    refused: str | None = None


def last_uses(cells: list[PlannedCell]) -> set[int]:
    """The indices of the cells after which each planned model is used no more (a runner
    unloads it there: a long plan does not hold every model it ran)."""
    return set({id(cell.model_ref): index for index, cell in enumerate(cells)}.values())


def scheme_variants(scheme: Scheme | str, calibration_seeds: list[int] | None) -> list[Scheme]:
    """The scheme, or one variant per calibration seed for calibrated schemes."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if not calibration_seeds or "calibration_seed" not in scheme.options:
        return [scheme]
    return [replace(scheme, options={**scheme.options, "calibration_seed": seed}) for seed in calibration_seeds]


def cell_config(ref: ModelRef, scheme: Scheme, task: str, protocol: PerplexityProtocol,
                data_hash: str, task_limit: int | None = None, evaluation: dict | None = None) -> dict:
    """What a cell computes; its hash is the record's key.  `evaluation`: the task's part
    (Task.evaluation) when the caller has it already; `data_hash`: the split's hash."""
    evaluation = evaluation or get_task(task).evaluation(protocol, task_limit)
    return {
        "model": {"name": ref.name, "checkpoint_hash": ref.checkpoint_hash},
        "scheme": scheme.key_json(), "scheme_hash": scheme.hash(),
        "evaluation": evaluation,
        "data_hash": data_hash,
        "seeds": {"evaluation": protocol.seed, "calibration": scheme.options.get("calibration_seed")},
        "qbench_version": qbench.__version__,
    }


KV_WARN_BELOW = 0.5  # warn when fewer than half the scored queries' attention reads are quantized
_KV_WARNED: set = set()


def check_kv_window(scheme: Scheme, protocol: PerplexityProtocol, task: str, model_name: str) -> None:
    """A KV scheme whose exact tokens (sink + residual) cover the evaluation window measures
    the unquantized model: refused here, before any weight loads.  One that leaves fewer
    than half the attention reads of the scored queries quantized is warned about, once
    per (scheme, protocol) in a process."""
    spec = scheme.kv_cache()
    if spec is None or not (spec.residual or spec.sink):
        return
    exact = f"first {spec.sink} and last {spec.residual} tokens exact"
    native = get_task(task).native
    if not native:
        message = (f"{scheme.name} keeps the {exact}: lm-eval items shorter than {spec.residual + spec.sink + 1} "
                   f"tokens read no quantized key or value")
    elif protocol.synthetic or task != "ppl":
        return
    else:
        last = protocol.window - 1 if protocol.kind == "rolling" else protocol.window - 2  # the last scored logit
        first = protocol.window // 2 if protocol.kind == "llamacpp" else protocol.score_from or 0
        share = spec.quantized_read_fraction(range(first, last + 1))
        if share == 0:
            raise ValueError(f"scheme {scheme.name} ({exact}) on model {model_name}: no query of protocol "
                             f"{protocol.id} reads a quantized key or value (the window is {protocol.window} "
                             f"tokens), so the cell would measure the unquantized model; use a longer --window "
                             f"or a scheme with a shorter exact window")
        if share >= KV_WARN_BELOW:
            return
        message = (f"{scheme.name} ({exact}) under {protocol.id}: only {share:.0%} of the scored queries' "
                   f"attention reads are quantized (a {protocol.window}-token window); its loss understates "
                   f"the scheme at longer contexts")
    seen = (scheme.name, protocol.id if native else task)
    if seen not in _KV_WARNED:
        _KV_WARNED.add(seen)
        print(f"qbench: warning: {message}", file=sys.stderr)


def cell_facts(ref: ModelRef, scheme: Scheme) -> dict:
    """What a record says about its model and scheme for the report (qbench.facts; not part
    of the key): the report reads these instead of the live registries."""
    return {"model": model_facts_from_info(ref.info), "scheme": scheme_facts_from_json(scheme.key_json())}


def expand_models(models: list[str]) -> list[str]:
    """'all' -> every zoo model; 'preset:NAME' -> the zoo models of that preset (in zoo order)."""
    zoo = None
    out = []
    for name in models:
        if name == "all" or name.startswith("preset:"):
            zoo = read_zoo() if zoo is None else zoo
            preset = name.removeprefix("preset:")
            out += [m for m, entry in zoo.items() if name == "all" or entry.get("preset") == preset]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def plan_cells(models: list[str], schemes: list[str | Scheme], tasks: list[str], limit: int | None = None,
               corpus: str | None = None, calibration_seeds: list[int] | None = None,
               task_limit: int | None = None, first_token: str | None = None,
               cache: dict | None = None, verify: bool = True,
               protocol: ProtocolOptions | None = None) -> list[PlannedCell]:
    """Every cell of models x schemes (x calibration seeds) x tasks, keyed; nothing runs.
    Downstream (lm-eval) tasks are left out for Bigram-Backcopy models, whose vocabulary
    is 48 characters of a synthetic task.  `cache`: model references and data hashes
    shared by several calls (the stages of one suite).  `verify=False`: zoo models whose
    checkpoint differs from models/zoo.yaml's hash are accepted (`--allow-modified`).
    `protocol`: the perplexity protocol chosen (default: the model's own)."""
    cache = {} if cache is None else cache
    models = expand_models(models)
    resolved = [get_scheme(s) if isinstance(s, str) else s for s in schemes]  # fail before any work on a typo
    check_tasks(tasks)
    variants = [v for scheme in resolved for v in scheme_variants(scheme, calibration_seeds)]
    from qbench.validate import check_cell_count

    check_cell_count(len(models) * len(variants) * len(tasks), "the plan")  # before resolving or keying any
    planned = []
    for model_name in models:
        if ("model", model_name) not in cache:
            cache["model", model_name] = resolve_model(model_name, verify=verify)  # weights load only if a cell is missing
        ref = cache["model", model_name]
        model_protocol = resolve_protocol(ref, limit, corpus, first_token, protocol)
        data = ("data", model_protocol.corpus, model_protocol.synthetic, model_protocol.split)
        if data not in cache:
            cache[data] = protocol_data_hash(model_protocol)
        data_hash = cache[data]
        model_tasks = tasks
        if model_protocol.synthetic:  # lm-eval tasks are text: not for a 48-character synthetic vocabulary
            model_tasks = [t for t in tasks if get_task(t).native]
        for scheme in variants:
            for task in model_tasks:
                cell_protocol = get_task(task).protocol(model_protocol)
                evaluation = None
                if not get_task(task).native:  # its items are read once per plan, not once per cell
                    if ("task", task, task_limit) not in cache:
                        cache["task", task, task_limit] = get_task(task).evaluation(cell_protocol, task_limit)
                    evaluation = cache["task", task, task_limit]
                check_kv_window(scheme, cell_protocol, task, model_name)
                config = cell_config(ref, scheme, task, cell_protocol, data_hash, task_limit, evaluation)
                cell = Cell(model_name, scheme, task, config)
                planned.append(PlannedCell(cell, cell_protocol, ref, task_limit,
                                           planning_refusal(ref.model_config, scheme, task)))
    unique = {p.cell.key: p for p in reversed(planned)}  # a model or seed given twice: one cell, run once
    return [p for p in planned if unique.get(p.cell.key) is p]


# -- suite files ------------------------------------------------------------------------------

STAGE_KEYS = {"name", "models", "arms", "schemes", "tasks", "calibration_seeds", "limit", "task_limit", "corpus",
              "protocol"}
SUITE_KEYS = STAGE_KEYS | {"resources", "stages"}
MAX_SUITE_BYTES = 1 << 20


class SuiteError(ValueError):
    """The suite file is missing, unreadable or names something that does not exist."""


@dataclass
class Stage:
    """One grid of a suite: models x schemes (x calibration seeds) x tasks."""
    name: str
    models: list[str]
    schemes: list[str]
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    calibration_seeds: list[int] | None = None
    limit: int | None = None
    task_limit: int | None = None
    corpus: str | None = None
    protocol: str | None = None  # a named perplexity protocol (qbench list protocols)
    arms: list[str] | None = None  # keep only the models of these attention arms (zoo `arm`)

    def model_names(self) -> list[str]:
        """The stage's models, `preset:`/`all` expanded, filtered by `arms` when given."""
        models = expand_models(self.models)
        if self.arms is None:
            return models
        zoo = read_zoo()
        return [m for m in models if zoo.get(m, {}).get("arm") in self.arms]


@dataclass
class Suite:
    """A suite file: one grid (its top-level keys) or several `stages` run in order, each
    taking the top-level keys as defaults."""
    name: str
    stages: list[Stage]
    resources: dict = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"suite {self.name!r} has no stage {name!r}{closest(name, [s.name for s in self.stages])}")


class _SuiteLoader(yaml.SafeLoader):
    """safe_load without aliases: a suite file is a few lists of names, and `*name`
    references are how a small file expands to billions of strings ("billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a suite file "
                                              "(write the entries out)", event.start_mark)
        return super().compose_node(parent, index)


def _suite_text(path: Path) -> str:
    """The suite file's text: a regular file of at most MAX_SUITE_BYTES."""
    from qbench.safefile import UnsafeFileError, read_bytes

    try:
        data = read_bytes(path, "suite", MAX_SUITE_BYTES)
    except FileNotFoundError:
        raise SuiteError(f"suite file {path} does not exist") from None
    except UnsafeFileError as err:
        raise SuiteError(str(err)) from None
    except OSError as err:
        raise SuiteError(f"suite file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SuiteError(f"suite file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _names(data: dict, key: str, where: str) -> list[str]:
    values = data[key] if isinstance(data[key], list) else [data[key]]
    for index, value in enumerate(values):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SuiteError(f"{where}: `{key}` entry {index + 1} is a {type(value).__name__}, not a name")
    return [str(v) for v in values]


def _corpus(data: dict, where: str) -> str | None:
    """`corpus:` one name or path (a string), or absent."""
    value = data.get("corpus")
    if value is not None and not isinstance(value, str):
        raise SuiteError(f"{where}: `corpus` must be one corpus name or path, got a {type(value).__name__}")
    return value


def _stage(data: dict, defaults: dict, name: str, where: str) -> Stage:
    """One stage from its own keys over the suite's (a key given as null overrides too)."""
    from qbench.validate import UsageError, positive_int, seed_list

    unknown = sorted(set(data) - STAGE_KEYS)
    if unknown:
        raise SuiteError(f"{where}: unknown key {unknown[0]!r}{closest(unknown[0], STAGE_KEYS)}")
    merged = {**defaults, **data}
    for key in ("models", "schemes"):
        if not merged.get(key):
            raise SuiteError(f"{where}: `{key}` must list at least one entry")
    seeds = merged.get("calibration_seeds")
    if merged.get("arms") is not None:
        from qbench.modeling.attention import ATTENTION_ARMS

        for arm in _names(merged, "arms", where):
            if arm not in ATTENTION_ARMS:
                raise SuiteError(f"{where}: unknown arm {arm!r} in `arms`{closest(arm, list(ATTENTION_ARMS))}")
    try:
        return Stage(name=str(merged.get("name", name))[:200], models=_names(merged, "models", where),
                     schemes=_names(merged, "schemes", where),
                     tasks=_names({"tasks": merged.get("tasks", ["ppl"])}, "tasks", where),
                     calibration_seeds=seed_list(seeds if isinstance(seeds, list) else [seeds], "calibration_seeds")
                     if seeds is not None else None,
                     limit=positive_int(merged.get("limit"), "limit"),
                     task_limit=positive_int(merged.get("task_limit"), "task_limit"), corpus=_corpus(merged, where),
                     arms=_names(merged, "arms", where) if merged.get("arms") is not None else None,
                     protocol=None if merged.get("protocol") is None else str(merged["protocol"]))
    except UsageError as err:
        raise SuiteError(f"{where}: {err}") from err


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    text = _suite_text(path)
    try:
        data = yaml.load(text, Loader=_SuiteLoader)  # noqa: S506 (a SafeLoader without aliases)
    except yaml.YAMLError as err:
        raise SuiteError(f"suite file {path} is not valid YAML: {' '.join(str(err).split())[:300]}") from err
    if not isinstance(data, dict):
        raise SuiteError(f"suite file {path} must be a mapping with keys {sorted(SUITE_KEYS)}")
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"suite file {path}: unknown key {unknown[0]!r}{closest(unknown[0], SUITE_KEYS)}")
    resources = _resources(data.get("resources"), f"suite file {path}")
    name = str(data.get("name", path.stem))[:200]
    defaults = {k: v for k, v in data.items() if k in STAGE_KEYS - {"name"}}
    if "stages" not in data:
        return _counted(Suite(name, [_stage(defaults, {}, name, f"suite file {path}")], resources), path)
    stages = data["stages"]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise SuiteError(f"suite file {path}: `stages` must be a list of mappings (each a grid)")
    return _counted(Suite(name, [_stage(s, defaults, f"stage {i + 1}", f"suite file {path}, stage "
                                        f"{str(s.get('name', i + 1))[:80]}") for i, s in enumerate(stages)],
                          resources), path)


def _counted(suite: Suite, path: Path) -> Suite:
    """The suite, unless its grids ask for more than MAX_CELLS cells (counted from the
    lists, before any model is resolved or cell built): a usage error naming the count."""
    from qbench.validate import UsageError, check_cell_count

    count = sum(len(s.models) * len(s.schemes) * max(1, len(s.calibration_seeds or ())) * len(s.tasks)
                for s in suite.stages)
    try:
        check_cell_count(count, f"suite file {path}")
    except UsageError as err:
        raise SuiteError(str(err)) from None
    return suite


def _resources(value, where: str) -> dict:
    """`resources:` a mapping of num_cpus / num_gpus (numbers in 0..MAX_THREADS, num_cpus > 0)
    and memory (bytes, a non-negative number)."""
    from qbench.validate import MAX_THREADS

    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: `resources` must be a mapping (num_cpus, num_gpus, memory), "
                         f"got a {type(value).__name__}")
    resources = {"num_cpus": 1, "num_gpus": 0, **value}
    bad = sorted((str(k) for k in set(resources) - {"num_cpus", "num_gpus", "memory"}))
    if bad:
        raise SuiteError(f"{where}: unknown resource {bad[0][:80]!r} (use num_cpus, num_gpus, memory)")
    for key, low, high in (("num_cpus", 0, MAX_THREADS), ("num_gpus", 0, MAX_THREADS), ("memory", 0, 2 ** 60)):
        number = resources.get(key, low)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not low <= number <= high \
                or (key == "num_cpus" and number <= 0):
            raise SuiteError(f"{where}: resources {key} must be a number in {'(' if key == 'num_cpus' else '['}"
                             f"{low}, {high}], got {str(number)[:80]}")
    return resources


def plan_stage(stage: Stage, cache: dict | None = None) -> list[PlannedCell]:
    return plan_cells(stage.model_names(), stage.schemes, stage.tasks, stage.limit, stage.corpus, stage.calibration_seeds,
                      stage.task_limit, cache=cache,
                      protocol=ProtocolOptions(stage.protocol) if stage.protocol else None)


def plan_suite(suite: Suite) -> list[PlannedCell]:
    """Every cell of the suite's stages in order, each key once (models are resolved and
    hashed, not loaded)."""
    planned, seen, cache = [], set(), {}
    try:
        for stage in suite.stages:
            for item in plan_stage(stage, cache):
                if item.cell.key not in seen:
                    seen.add(item.cell.key)
                    planned.append(item)
    except KeyError as err:
        raise SuiteError(f"suite {suite.name!r}: {err.args[0] if err.args else err}") from err
    return planned
