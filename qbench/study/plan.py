"""The study's plan: which cells (checkpoints x schemes x tasks x calibration draws) it
measures, and `run_study`, which computes the missing ones (only when asked: `qbench study
--compute`; writing STUDY.md never computes)."""
from __future__ import annotations

from dataclasses import dataclass, field

from qbench.modeling.attention import ATTENTION_ARMS
from qbench.results import ResultStore
from qbench.zoo import read_zoo

TINY_SCHEMES = ["fp32", "w8a8-pt", "w8a8-dyn", "w8a8-attn", "w4-rtn-g64", "w4a8", "w6a6", "llm-int8",
                "llm-int8-t0", "nf4", "quanto-w8a8"]
# The small preset (tiny's architecture, 16x its tokens, trained on a GPU): the schemes that
# separate the arms on the tiny zoo, at calibration draw 0.
SMALL_SCHEMES = ["fp32", "w8a8-pt", "w8a8-dyn", "w8a8-attn", "w4-rtn-g64", "w4a8", "w6a6", "llm-int8-t0", "nf4"]
SMOLLM2_SCHEMES = ["fp32", "llm-int8", "llm-int8-t0", "w8a8-pt", "w8a8-dyn", "nf4"]
# Section 5, "on more text": the schemes re-measured on the whole test split (tiny, small)
# and on >= 20,000 tokens (SmolLM2: 95,000 characters are about 20,500 of its tokens),
# calibration draw 0.  The short protocol is the first `limit` characters.
LONG_SCHEMES = ["fp32", "w8a8-pt", "w8a8-dyn", "w4-rtn-g64"]
SMOLLM2_LONG_SCHEMES = ["fp32", "w8a8-pt", "w8a8-dyn", "w4-rtn-g64", "nf4"]
SMOLLM2_LONG_LIMIT = 95000
BB_ARMS = list(ATTENTION_ARMS)  # display order: the registry's
# Outlier-aware PTQ (issue 15): each method beside the plain scheme it modifies, as the
# columns of the table users want.
PTQ_COLUMNS = [("W8A8-pt", "w8a8-pt"), ("+ SmoothQuant", "w8a8-pt-sq"), ("+ rotation", "w8a8-pt-had"),
               ("W8A8-dyn", "w8a8-dyn"), ("dyn + SQ", "w8a8-sq"), ("dyn + rotation", "w8a8-had"),
               ("W4A8", "w4a8"), ("W4A8 + rotation", "w4a8-had"),
               ("W4 RTN g64", "w4-rtn-g64"), ("GPTQ g64", "w4-gptq-g64"), ("AWQ g64", "w4-awq-g64"),
               ("HQQ g64", "w4-hqq-g64")]
PTQ_SCHEMES = [scheme for _, scheme in PTQ_COLUMNS]

BB_GUO_PRESETS = ["bb-guo-cpu", "bb3-guo-cpu", "bb-guo", "bb3-guo"]
BB_SCHEMES = ["fp32", "w8a8-pt", "w8a8-dyn", "w8a8-attn", "w6a6", "w4a8", "llm-int8-t0"]


@dataclass
class StudyPlan:
    tiny_models: list[str]
    tiny_schemes: list[str]
    calibration_seeds: list[int]
    tiny_tasks: list[str]
    task_schemes: list[str]  # downstream task cells: these schemes, calibration draw 0
    task_limit: int | None
    smollm2: bool
    smollm2_schemes: list[str] = field(default_factory=lambda: list(SMOLLM2_SCHEMES))
    limit: int = 20000
    small_models: list[str] = field(default_factory=list)
    small_schemes: list[str] = field(default_factory=lambda: list(SMALL_SCHEMES))
    ptq_schemes: list[str] = field(default_factory=list)
    bb_models: list[str] = field(default_factory=list)
    long_models: list[str] = field(default_factory=list)  # whole test split, LONG_SCHEMES, draw 0


def plan(quick: bool) -> StudyPlan:
    zoo = read_zoo()
    if quick:
        return StudyPlan(tiny_models=[m for m in ("bb-softmax", "bb-vga") if m in zoo],
                         tiny_schemes=["fp32", "w8a8-dyn", "w8a8-pt"], calibration_seeds=[0, 1],
                         tiny_tasks=["ppl"], task_schemes=[], task_limit=None, smollm2=False, limit=4000)
    tiny = [name for name, entry in zoo.items() if entry.get("preset") == "tiny"]
    small = [name for name, entry in zoo.items() if entry.get("preset") == "small"]
    return StudyPlan(tiny_models=tiny, tiny_schemes=TINY_SCHEMES, calibration_seeds=[0, 1, 2],
                     tiny_tasks=["ppl", "probes"],
                     task_schemes=["fp32", "w8a8-pt", "w8a8-dyn", "w4-rtn-g64", "llm-int8-t0", "nf4"],
                     task_limit=500, smollm2=True, small_models=small, ptq_schemes=list(PTQ_SCHEMES),
                     bb_models=[name for name, entry in zoo.items() if entry.get("preset") in BB_GUO_PRESETS],
                     long_models=tiny + small)


def stages(p: StudyPlan) -> list[tuple[list[str], list[str], list[str], dict]]:
    """The plan as (models, schemes, tasks, run_bench options) in the order it is computed:
    staged so that an interrupted run leaves the most useful records first (perplexity of
    every arm x scheme at calibration draw 0 with the fp32 probes, the small preset, the
    probes under each scheme, the downstream task, SmolLM2, then the other draws)."""
    from qbench.quant import get_scheme

    out = [(p.tiny_models, p.tiny_schemes, ["ppl"], {"calibration_seeds": p.calibration_seeds[:1]})]
    if "probes" in p.tiny_tasks:
        out.append((p.tiny_models, ["fp32"], ["probes"], {}))
    if p.small_models:
        out.append((p.small_models, p.small_schemes, ["ppl"], {"calibration_seeds": [0]}))
        out.append((p.small_models, ["fp32"], ["probes"], {}))
    if [t for t in p.tiny_tasks if t != "ppl"]:
        out.append((p.tiny_models, p.tiny_schemes, [t for t in p.tiny_tasks if t != "ppl"],
                    {"calibration_seeds": p.calibration_seeds[:1]}))
    if p.task_schemes:
        out.append((p.tiny_models, p.task_schemes, ["qbench_agreement"], {"calibration_seeds": [0]}))
    if p.smollm2:  # probes on fp32 only: the outliers every scheme faces
        out.append((["smollm2-135m"], p.smollm2_schemes, ["ppl"], {"calibration_seeds": [0]}))
        out.append((["smollm2-135m"], ["fp32"], ["probes"], {}))
    if p.small_models:
        out.append((p.small_models, p.small_schemes, ["probes"], {"calibration_seeds": [0]}))
    if p.bb_models:  # the BB testbed at Guo et al.'s recipe: the copy circuit under every 8-bit scheme
        out.append((p.bb_models, BB_SCHEMES, ["ppl"], {"calibration_seeds": p.calibration_seeds}))
    if p.ptq_schemes:  # SmolLM2 first (it has the outliers), every draw; then the CPU zoo at draw 0
        if p.smollm2:
            out.append((["smollm2-135m"], ["fp32"] + p.ptq_schemes, ["ppl"],
                        {"calibration_seeds": p.calibration_seeds}))
        out.append((p.tiny_models + p.small_models, p.ptq_schemes, ["ppl"], {"calibration_seeds": [0]}))
    calibrated = [s for s in p.tiny_schemes if "calibration_seed" in get_scheme(s).options]
    if len(p.calibration_seeds) > 1 and calibrated:
        out.append((p.tiny_models, calibrated, p.tiny_tasks, {"calibration_seeds": p.calibration_seeds[1:]}))
    if p.long_models:  # section 5: more text (about 19x the tokens of the short protocol per cell)
        out.append((p.long_models, LONG_SCHEMES, ["ppl"], {"limit": None, "calibration_seeds": [0]}))
    if p.smollm2 and p.long_models:
        out.append((["smollm2-135m"], SMOLLM2_LONG_SCHEMES, ["ppl"],
                    {"limit": SMOLLM2_LONG_LIMIT, "calibration_seeds": [0]}))
    return [stage for stage in out if stage[0] and stage[1]]


def run_study(store: ResultStore, quick: bool = False, progress: bool = True) -> list[dict]:
    """Compute every cell of the plan that the store lacks (hours on a CPU for the full plan)."""
    from qbench.bench import run_bench

    p = plan(quick)
    records = []
    for models, schemes, tasks, options in stages(p):
        options = {"limit": p.limit, "task_limit": p.task_limit, **options}
        records += run_bench(models, schemes, tasks, store=store, progress=progress, **options)
    return records


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
    from qbench.bench import plan_cells

    p = plan(quick)
    keys = {r["key"] for r in store.records()}
    planned = held = 0
    missing: dict[str, int] = {}
    seen = set()
    for models, schemes, tasks, options in stages(p):
        options = {"limit": p.limit, "task_limit": p.task_limit, **options}
        for cell in plan_cells(models, schemes, tasks, **options):
            key = cell.cell.key
            if key in seen:
                continue
            seen.add(key)
            planned += 1
            if key in keys:
                held += 1
            else:
                what = f"{cell.cell.model.split('-')[0]} {cell.cell.task}"
                missing[what] = missing.get(what, 0) + 1
    return Coverage(planned, held, sorted(missing.items()))
