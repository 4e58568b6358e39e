"""The study's plan is a suite file, `suites/study.yaml` (`suites/study-quick.yaml` for
`--quick`), planned by the one planner (qbench.plan) like every suite.  This module reads
it for the study: `run_study` computes the missing cells (only when asked: `qbench study
--compute`; writing STUDY.md never computes), `coverage` counts what the store holds, and
`StudyPlan` is the writer's view of the suite's stages (which models and schemes each
section shows), found by stage name."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from qbench.modeling.attention import ATTENTION_ARMS
from qbench.paths import REPO_ROOT
from qbench.plan import Suite, expand_models, load_suite, plan_suite
from qbench.results import ResultStore
from qbench.scheme_catalog import label

SUITES = {False: REPO_ROOT / "suites" / "study.yaml", True: REPO_ROOT / "suites" / "study-quick.yaml"}
BB_ARMS = list(ATTENTION_ARMS)  # display order: the registry's


@lru_cache(maxsize=None)
def study_suite(quick: bool = False) -> Suite:
    return load_suite(SUITES[quick])


def _stage(suite: Suite, name: str):
    return next((s for s in suite.stages if s.name == name), None)


def _schemes(suite: Suite, name: str) -> list[str]:
    stage = _stage(suite, name)
    return list(stage.schemes) if stage else []


def _models(suite: Suite, name: str) -> list[str]:
    stage = _stage(suite, name)
    return stage.model_names() if stage else []


_FULL = study_suite(False)
PTQ_SCHEMES = _schemes(_FULL, "ptq")
# Outlier-aware PTQ (issue 15): each scheme of the `ptq` stage under its catalogue label
PTQ_COLUMNS = [(label(scheme), scheme) for scheme in PTQ_SCHEMES]
BB_SCHEMES = _schemes(_FULL, "bb")
LONG_SCHEMES = _schemes(_FULL, "more text")
SMOLLM2_LONG_SCHEMES = _schemes(_FULL, "smollm2 more text")
SMOLLM2_LONG_LIMIT = _FULL.stage("smollm2 more text").limit
BB_GUO_PRESETS = [m.removeprefix("preset:") for m in _FULL.stage("bb").models]


@dataclass
class StudyPlan:
    """The writer's view of the study suite: its groups of models and schemes."""
    tiny_models: list[str]
    tiny_schemes: list[str]
    calibration_seeds: list[int]
    tiny_tasks: list[str]
    task_schemes: list[str]  # downstream task cells: these schemes, calibration draw 0
    task_limit: int | None
    smollm2: bool
    smollm2_schemes: list[str] = field(default_factory=list)
    limit: int = 20000
    small_models: list[str] = field(default_factory=list)
    small_schemes: list[str] = field(default_factory=list)
    ptq_schemes: list[str] = field(default_factory=list)
    bb_models: list[str] = field(default_factory=list)
    long_models: list[str] = field(default_factory=list)  # whole test split, LONG_SCHEMES, draw 0


def plan(quick: bool) -> StudyPlan:
    suite = study_suite(quick)
    tiny, draws = suite.stage("tiny"), _stage(suite, "tiny other draws")
    seeds = list(tiny.calibration_seeds or []) + list(draws.calibration_seeds or [] if draws else [])
    tasks = ["ppl"] + (["probes"] if _stage(suite, "tiny probes") else [])
    agreement = _stage(suite, "tiny agreement")
    return StudyPlan(tiny_models=expand_models(tiny.models), tiny_schemes=list(tiny.schemes), calibration_seeds=seeds,
                     tiny_tasks=tasks, task_schemes=_schemes(suite, "tiny agreement"),
                     task_limit=agreement.task_limit if agreement else None,
                     smollm2=_stage(suite, "smollm2") is not None, smollm2_schemes=_schemes(suite, "smollm2"),
                     limit=tiny.limit, small_models=_models(suite, "small"), small_schemes=_schemes(suite, "small"),
                     ptq_schemes=_schemes(suite, "ptq"), bb_models=_models(suite, "bb"),
                     long_models=_models(suite, "more text"))


def run_study(store: ResultStore, quick: bool = False, progress: bool = True,
              stages: list[str] | None = None) -> list[dict]:
    """Compute every cell of the study suite that the store lacks (hours on a CPU for the full
    one); `stages`: only the cells of these stages (by name, e.g. ["primary"])."""
    from qbench.runner import run_cells

    suite = study_suite(quick)
    if stages:
        suite = Suite(suite.name, [suite.stage(name) for name in stages], suite.resources)
    return run_cells(plan_suite(suite), store, progress=progress)


@dataclass
class Coverage:
    """How much of the plan the store holds: `held` of `planned` cells, the missing ones by stage."""
    planned: int
    held: int
    missing: list[tuple[str, int]]  # (stage description, missing cells)

    def sentence(self) -> str:
        text = f"The store holds {self.held:,} of the {self.planned:,} cells of this study's plan"
        if not self.missing:
            return text + " (all of them)."
        parts = ", ".join(f"{what}: {n}" for what, n in self.missing)
        return (text + f"; missing ({self.planned - self.held:,}, computed by `qbench study --compute`): {parts}. "
                "Tables show what is held.")


def coverage(store: ResultStore, quick: bool = False) -> Coverage:
    """Plan every cell (no weights load, nothing runs) and count those with a record."""
    keys = {r["key"] for r in store.records()}
    planned = plan_suite(study_suite(quick))
    missing: dict[str, int] = {}
    for cell in (p.cell for p in planned if p.cell.key not in keys):
        what = f"{cell.model.split('-')[0]} {cell.task}"
        missing[what] = missing.get(what, 0) + 1
    return Coverage(len(planned), len(planned) - sum(missing.values()), sorted(missing.items()))
