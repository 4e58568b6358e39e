"""STUDY.md from the result store and the checkpoints' mechanism logs (computes nothing)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from qbench.report import comparison_table, compact_markdown, markdown_table
from qbench.results import ResultStore, atomic_write_text
from qbench.study.claims import PRIMARY_ENDPOINT, SPREAD_DEFINITION, claims_table, headline_table
from qbench.study.facts import Facts
from qbench.study.verdict import RULE_TEXT, chance_sentence
from qbench.study.mechanism import bb_quant_tables, mechanism_logs, mechanism_plot, mechanism_table
from qbench.study.plan import (BB_GUO_PRESETS, BB_SCHEMES, LONG_SCHEMES, SMOLLM2_LONG_LIMIT, SMOLLM2_LONG_SCHEMES,
                               Coverage, StudyPlan, plan, coverage as study_coverage)
from qbench.study.published import GUO_PUBLISHED, PUBLISHED
from qbench.study.tables import (arm_label, arm_table, degradation_plot, extreme_token_table, more_text_table,
                                 ptq_table, smollm2_probe_summary, split_protocols)
from qbench.zoo import read_zoo


def _extremes_and_plot(store: ResultStore, full: pd.DataFrame, models: list[str], schemes: list[str], out: Path,
                       name: str, intro: str, title: str) -> list[str]:
    """The extreme-token table and the degradation plot of one group of checkpoints."""
    lines = []
    extreme = extreme_token_table(store, models)
    if not extreme.empty:
        lines += [intro, "", markdown_table(extreme), ""]
    plot = degradation_plot(full, models, schemes, out / "plots" / f"{name}_degradation.png", title)
    if plot is not None:
        lines += [f"![{name} degradation]({plot.relative_to(out)})", ""]
    return lines


def more_text_section(short: pd.DataFrame, long: pd.DataFrame, p: StudyPlan) -> list[str]:
    """Section 5: the schemes of LONG_SCHEMES on the whole test split (tiny, small) and
    SmolLM2 on its longer prefix, beside the short protocol's numbers for the same cells."""
    lines = ['## <a id="s5"></a>5. On more text', ""]
    groups = [("tiny", p.tiny_models), ("small", p.small_models)]
    tables = [(name, more_text_table(short, long, [m for m in p.long_models if m in models], LONG_SCHEMES))
              for name, models in groups]
    tables = [(name, t) for name, t in tables if not t.empty]
    smol_long = long[(long.model == "smollm2-135m") & (long.status == "ok")
                     & long.protocol.str.endswith(f"-first{SMOLLM2_LONG_LIMIT}c")]
    if not tables and smol_long.empty:
        return lines + ["No records on more text yet (`qbench study --compute` runs them last).", ""]
    protocol = next((t for t in long.protocol if t.startswith("nonoverlap") and "-first" not in t), "-")
    lines += [f"The short protocol (sections 2-4) reads the first {p.limit:,} characters of the test split "
              f"(about 5,300 tokens for the zoo's tokenizer, 4,300 for SmolLM2's). Here the zoo is measured on "
              f"the whole test split (`{protocol}`) and SmolLM2 on its first {SMOLLM2_LONG_LIMIT:,} characters, "
              "calibration draw 0. `rel_delta_%`, KL and top-1 are on the long protocol, mean ± std over the "
              "checkpoints measured (`n_seeds`); `rel_delta_% short` is the same checkpoints on the short "
              "protocol (mean over its calibration draws).", ""]
    for name, table in tables:
        lines += [f"{name}:", "", markdown_table(table), ""]
    if not smol_long.empty:
        short_smol = short[(short.model == "smollm2-135m") & (short.status == "ok")].set_index("scheme")
        rows = smol_long[smol_long.scheme.isin(SMOLLM2_LONG_SCHEMES)].copy()
        rows["rel_delta_% short"] = [short_smol["rel_delta_%"].get(sc, float("nan")) for sc in rows.scheme]
        rows["tokens"] = rows["tokens"].astype(int)
        columns = ["scheme", "tokens", "ppl", "rel_delta_%", "kl", "top1_agreement", "rel_delta_% short"]
        order = {sc: i for i, sc in enumerate(SMOLLM2_LONG_SCHEMES)}
        rows = rows.sort_values("scheme", key=lambda c: c.map(order))
        lines += ["SmolLM2-135M:", "", markdown_table(rows[columns]), ""]
    return lines


# -- the sections, in reading order ------------------------------------------------------
@dataclass
class StudyContext:
    """What every section reads: the store's records and the tables built from them once."""
    store: ResultStore
    records: list[dict]
    out: Path
    models_dir: Path
    plan: StudyPlan
    quick: bool
    full: pd.DataFrame  # sections 2-4: the short protocol (and BB's)
    long: pd.DataFrame  # section 5: more text
    facts: Facts
    discussion: Path | None = None
    coverage: Coverage | None = None

    @property
    def plots(self) -> Path:
        return self.out / "plots"


def header_section(ctx: StudyContext) -> list[str]:
    from qbench.study.answer import answer

    lines = ["# qbench study: does VGA keep transformers quantizable, at CPU scale?", ""]
    if not ctx.quick:
        lines += [answer(ctx.facts), ""]
    lines += ["Generated by `qbench study` from the committed records (`results/records/`) and the checkpoints' "
             "mechanism logs (`models/bb-*/mechanism_log.csv`); writing it computes nothing."
             + (" **QUICK variant** (pipeline smoke test)." if ctx.quick else "")]
    if ctx.coverage is not None:
        lines[-1] += " " + ctx.coverage.sentence()
    lines += ["", f"Primary endpoint: {PRIMARY_ENDPOINT}. {SPREAD_DEFINITION}.", ""]
    return lines


def claims_section(ctx: StudyContext) -> list[str]:
    if ctx.quick:
        return []
    table = claims_table(ctx.facts)
    judged = sum(cell.count(label) for cell in table.verdict for label in ("supported", "contradicted", "not shown"))
    return ["## The claims against our evidence", "",
            f"The rule (`qbench/study/verdict.py`, applied by code to every row): {RULE_TEXT}. " + chance_sentence()
            + f" This table judges {judged} scope(s) (the others are insufficient or untested).",
            "", compact_markdown(table), ""]


def headline_section(ctx: StudyContext) -> list[str]:
    if ctx.quick:
        return []
    table = headline_table(ctx.facts)
    if table.empty:
        return []
    return ["## Headline per arm", "",
            "`n` training seeds; fp32 perplexity; relative perplexity change (%) under `w8a8-pt` on the whole "
            "test split (the primary endpoint: mean over 3 calibration draws per seed), on the first 20,000 "
            "characters (`20k`, the quick check) and under 4-bit weights (RTN, groups of 64) on the whole split; fp32 extreme-token indicators (`sink %` = sink rate@0.3, `inf-norm` = max inf-norm, "
            "`kurt. max` = largest kurtosis over tracked tensors); `vs softmax`: the verdict of the rule above on "
            "\"the arm loses less than softmax\" on the whole split (W8A8-pt / W4). `a±b` = mean ± sample std "
            "over seeds (SmolLM2: over calibration draws).",
            "", compact_markdown(table), ""] + provenance_lines(ctx)


def provenance_lines(ctx: StudyContext) -> list[str]:
    """How each headline checkpoint was trained (model cards and safetensors headers)."""
    from qbench.study.facts import group_of
    from qbench.study.provenance import provenance_table

    groups: dict = {}
    for name, entry in read_zoo().items():
        group = group_of(name, entry)
        if group in ("tiny", "small", "small3k"):
            groups.setdefault(group, []).append((name, entry.get("arm"), entry.get("seed", 0)))
    table = provenance_table(ctx.models_dir, groups)
    if table.empty:
        return []
    return ["Provenance per checkpoint (model cards; stored dtype from the safetensors header; epochs = training "
            "tokens over the training split's tokens). Arms whose seeds differ in device or stored dtype compare "
            "checkpoints of different arithmetic histories; SmolLM2 is the published GGUF.", "",
            compact_markdown(table), ""]


def mechanism_section(ctx: StudyContext) -> list[str]:
    logs = mechanism_logs(ctx.models_dir)
    lines = ['## <a id="s1"></a>1. Mechanism: Bigram-Backcopy (Guo et al.)', ""]
    table = mechanism_table(logs)
    if table.empty:
        return lines + ["No bb checkpoint with a mechanism log in the zoo.", ""]
    lines += [f"Final values (step {table.step.iloc[0]}) on 64 fixed sequences, mean ± std over training "
              "seeds (`seeds`). Recipe: `bb` preset (1 layer, 1 head, width 256, batch 128, 1,000 steps; "
              "the original used batch 512 and 10,000 steps). With one head, attention on BOS (`attn_s`) is the "
              "sink measure here: sink rate@0.3 would count a head at 0.34 as 100% and one at 0.24 as 0%.", "",
              markdown_table(table), ""]
    plot = mechanism_plot(logs, ctx.plots / "mechanism_curves.png")
    lines += [f"![mechanism curves]({plot.relative_to(ctx.out)})", ""]
    zoo = read_zoo()
    letters = iter("bcdefg")
    for preset in BB_GUO_PRESETS:
        guo_logs = mechanism_logs(ctx.models_dir, preset)
        if not guo_logs:
            continue
        entry = next(e for e in zoo.values() if e.get("preset") == preset)
        from qbench.train import get_preset

        recipe = get_preset(preset)
        layers = recipe.n_layer
        letter = next(letters)
        guo = mechanism_table(guo_logs)
        if layers == 1:  # Guo et al.'s published end state is of their 1-layer run
            guo = pd.concat([guo, pd.DataFrame([GUO_PUBLISHED])], ignore_index=True)
            published = "the last row is Guo et al.'s 1-layer run (10,000 x 512), read off their figures"
        else:
            published = (f"{layers} layers: Guo et al.'s curves for this depth are not tabulated here (their "
                         "1-layer end state is in the table above)")
        lines += [f'### <a id="s1{letter}"></a>1{letter}. At Guo et al.\'s recipe: `{preset}`', "",
                  f"Preset `{preset}` ({layers} layer(s), {entry.get('steps', recipe.steps)} steps of batch {recipe.batch_size}; "
                  "`qbench list presets` gives the whole recipe: AdamW betas (0.9, 0.99), weight decay 1e-4, "
                  "constant 3e-4, no warm-up, no clipping). Final values, mean ± std over training seeds; "
                  f"{published}.", "", markdown_table(guo), ""]
        plot = mechanism_plot(guo_logs, ctx.plots / f"mechanism_curves_{preset}.png")
        if plot is not None:
            lines += [f"![mechanism curves {preset}]({plot.relative_to(ctx.out)})", ""]
        models = [name for name, e in zoo.items() if e.get("preset") == preset]
        by_arm, checkpoints = bb_quant_tables(ctx.records, models, BB_SCHEMES)
        if not by_arm.empty:
            lines += ["Under quantization (BB protocol: 64 sequences of 64 tokens; the copy circuit is the "
                      "positions right after a trigger, the rest are bigram positions). Δ = quantized minus the "
                      "same checkpoint's fp32; accuracies are fractions, losses nats per token; mean ± std over "
                      "training seeds of each checkpoint's mean over calibration draws (`n_draws`). Sink "
                      "attn_s (attention on BOS, the largest over layers) and residual peak (max |h| at BOS over "
                      "the median |h|, the largest over layers) are measured on the model as it computes under "
                      "the scheme.", "", markdown_table(by_arm), "",
                      "Per checkpoint: its fp32 extreme-token indicators beside its largest copy-accuracy drop "
                      "over the schemes above:", "", markdown_table(checkpoints), ""]
    return lines


def tiny_section(ctx: StudyContext) -> list[str]:
    p, full = ctx.plan, ctx.full
    lines = ['## <a id="s2"></a>2. The tiny zoo under every scheme', ""]
    tiny = arm_table(full, p.tiny_models, p.tiny_schemes) if not full.empty else pd.DataFrame()
    if tiny.empty:
        return lines + ["No records yet.", ""]
    lines += [f"Perplexity protocol `{full[full.model.isin(p.tiny_models)].protocol.iloc[0]}`; calibrated "
              f"schemes averaged over calibration draws {p.calibration_seeds}; ± is the sample std over training "
              "seeds (`n_seeds`) of each checkpoint's mean over its draws; `ppl_std_draws` is the largest "
              "std over draws of one checkpoint. Published rows (OPT-125m, for direction only):", "",
              PUBLISHED, ""] + split_table(tiny) + [""]
    lines += _extremes_and_plot(ctx.store, full, p.tiny_models, p.tiny_schemes, ctx.out, "tiny",
                                "Extreme tokens at fp32 (probe records; mean ± std over training seeds; "
                                "`value_ratio_min` is the smallest over layers of ||V_0|| / mean ||V_j||; "
                                "gates are the mean gate value at token 0 and at the other tokens, for gated "
                                "arms):", "tiny zoo: perplexity change per scheme (bars: mean over seeds; "
                                "whiskers: min-max)")
    return lines


def small_section(ctx: StudyContext) -> list[str]:
    p, full = ctx.plan, ctx.full
    if not p.small_models:
        return []
    lines = ['## <a id="s2b"></a>2b. The small preset: the same architecture, 16x the training tokens (GPU)', ""]
    small = arm_table(full, p.small_models, p.small_schemes) if not full.empty else pd.DataFrame()
    if small.empty:
        return lines + ["No records yet.", ""]
    lines += ["Trained on an H200 (`scripts/gpu_zoo.py`, log in `study/gpu_zoo.log`): tiny's architecture "
              "and tokenizer, batch 256 x 256 tokens, 1,000 steps (65.5M tokens, about 24 passes over "
              "the 2.7M-token training split), bf16 autocast, weights stored bf16. The `(3000 steps)` "
              "rows ran three times longer and overfit (their fp32 perplexity is in the table): they "
              "show what longer training does to extreme tokens, not a better model. "
              "Calibration draw 0 only.", ""] + split_table(small) + [""]
    lines += _extremes_and_plot(ctx.store, full, p.small_models, p.small_schemes, ctx.out, "small",
                                "Extreme tokens at fp32 (as for the tiny zoo):",
                                "small preset: perplexity change per scheme")
    return lines


def smollm2_section(ctx: StudyContext) -> list[str]:
    if not ctx.plan.smollm2:
        return []
    full = ctx.full
    lines = ['## <a id="s3"></a>3. SmolLM2-135M (pretrained, from its GGUF)', ""]
    smol = full[full.model == "smollm2-135m"] if not full.empty else pd.DataFrame()
    if smol.empty:
        lines += ["No records yet.", ""]
    else:
        smol = smol[smol.scheme.isin(ctx.plan.smollm2_schemes + ["w8a8-attn"])]
        columns = [c for c in ["scheme", "n", "ppl", "ppl_std", "rel_delta_%", "kl", "top1_agreement"] if c in smol]
        lines += [f"Protocol `{smol.protocol.iloc[0]}`; `n` calibration draws, `ppl_std` their sample std.", "",
                  markdown_table(smol[columns]), ""]
    probes, share = smollm2_probe_summary(ctx.store)
    if not probes.empty:
        lines += ["Extreme tokens (probes, 64 windows of T = 64):", "", markdown_table(probes), ""]
    if share:
        lines += ["fp32 first-token attention share per layer: "
                  + ", ".join(f"{i}: {v:.2f}" for i, v in enumerate(share)), ""]
    return lines


def ptq_section(ctx: StudyContext) -> list[str]:
    p, full = ctx.plan, ctx.full
    if not p.ptq_schemes or full.empty:
        return []
    lines = ['## <a id="s4"></a>4. Outlier-aware PTQ', ""]
    zoo = read_zoo()
    rows = [("smollm2-135m", ["smollm2-135m"])]
    arms: dict[str, list[str]] = {}
    for name in p.tiny_models:
        arms.setdefault(f"tiny {arm_label(name, zoo.get(name, {}))}", []).append(name)
    for name in p.small_models:
        arms.setdefault(f"small {arm_label(name, zoo.get(name, {}))}", []).append(name)
    rows += list(arms.items())
    ptq = ptq_table(full, rows)
    eight = [c for c in ptq.columns if c in ("model / arm", "W8A8-pt", "+ SmoothQuant", "+ rotation", "W8A8-dyn",
                                             "dyn + SQ", "dyn + rotation")]
    lines += ["Relative perplexity change against fp32 (%), same protocol as the sections above. SmolLM2: "
              "mean ± std over calibration draws (n). Zoo rows: mean ± std over training seeds of each "
              "checkpoint's mean over its calibration draws (the new methods: draw 0), `(seeds x draws)`. "
              "SmoothQuant (alpha 0.5) and the Hadamard rotation are folded into the float model before the named "
              "quantizers; GPTQ / AWQ / HQQ are 4-bit weight-only, compared with round-to-nearest at the same "
              "group size. `w8a8-had` draws are different random Hadamard signs.", "",
              "8-bit activations:", "", markdown_table(ptq[eight]), "", "4-bit weights:", "",
              markdown_table(ptq[["model / arm"] + [c for c in ptq.columns if c not in eight]]), ""]
    smol = full[(full.model == "smollm2-135m") & (full.status == "ok")
                & full.scheme.isin(["fp32"] + p.ptq_schemes)].copy()
    if not smol.empty:
        order = {s: i for i, s in enumerate(["fp32"] + p.ptq_schemes)}
        smol = smol.sort_values("scheme", key=lambda c: c.map(order))
        columns = [c for c in ["scheme", "n", "ppl", "ppl_std", "rel_delta_%", "kl", "top1_agreement",
                               "agreement_acc", "agreement_flip_rate"] if c in smol]
        lines += ["SmolLM2 in detail (`n` calibration draws; `ppl_std` over them; KL and top-1 against fp32 "
                  "on the same tokens; `qbench_agreement` on 200 items at draw 0 where measured):", "",
                  markdown_table(smol[columns]), ""]
    sweep = full[(full.model == "smollm2-135m") & (full.status == "ok")
                 & full.scheme.isin(["w8a8-sq-a25", "w8a8-sq", "w8a8-sq-a75", "w8a8-sq-a85"])]
    if len(sweep) > 1:
        alpha = {"w8a8-sq-a25": 0.25, "w8a8-sq": 0.5, "w8a8-sq-a75": 0.75, "w8a8-sq-a85": 0.85}
        sweep = sweep.assign(alpha=[alpha[x] for x in sweep.scheme]).sort_values("alpha")
        lines += ["SmoothQuant's alpha on SmolLM2 (then `w8a8-dyn`; relative perplexity change, %): "
                  + ", ".join(f"alpha {a}: {v:+.2f} (n={n})" for a, v, n in
                              zip(sweep.alpha, sweep["rel_delta_%"], sweep["n"])), ""]
    return lines


def more_text(ctx: StudyContext) -> list[str]:
    if not ctx.plan.long_models or ctx.full.empty:
        return []
    return more_text_section(ctx.full, ctx.long, ctx.plan)


def discussion_section(ctx: StudyContext) -> list[str]:
    if ctx.discussion is None or not Path(ctx.discussion).exists():
        return []
    return [ctx.facts.render(Path(ctx.discussion).read_text()).strip(), ""]


def regenerate_section(ctx: StudyContext) -> list[str]:
    return ["## Regenerate", "", "```",
            "make study                       # this file from the committed records (computes nothing)",
            "make study STUDY_ARGS=--compute  # first compute the plan's missing cells (hours on a CPU)",
            "make study QUICK=1               # the pipeline on bb-softmax/bb-vga only (minutes)",
            "qbench recheck -n 5              # recompute 5 random stored cells, print their drift",
            "python scripts/train_queue.py --queue bb --worker 0/2   # (and 1/2) the bb checkpoints",
            "python scripts/train_queue.py --queue tiny              # tiny checkpoints, CPU (hours)",
            "python scripts/gpu_zoo.py train --work /tmp/gpu_zoo --out OUT --budget 420   # on a CUDA machine:",
            "python scripts/gpu_zoo.py unpack OUT                    #   small-* and tiny seeds, then here",
            "qbench zoo                                              # re-measure models/zoo.yaml",
            "```", ""]


SectionFunction = Callable[[StudyContext], list[str]]
# STUDY.md, in reading order.  Another part of qbench adds its section with one line:
#     register_section(kv_section)      # kv_section(records) -> markdown ("" to leave it out)
# which places it before the discussion.
SECTIONS: list[SectionFunction] = [header_section, claims_section, headline_section, mechanism_section,
                                   tiny_section, small_section, smollm2_section, ptq_section, more_text,
                                   discussion_section, regenerate_section]


def register_section(section: Callable[[list[dict]], str], before: SectionFunction = discussion_section) -> None:
    """Add a section that is a function of the records (returning markdown, "" for none)."""
    def from_records(ctx: StudyContext) -> list[str]:
        text = section(ctx.records)
        return [text.strip(), ""] if text and text.strip() else []

    from_records.__name__ = getattr(section, "__name__", "section")
    if any(getattr(s, "__name__", None) == from_records.__name__ for s in SECTIONS):
        return  # registered already
    SECTIONS.insert(SECTIONS.index(before), from_records)


from qbench.study import kv, retrofit, retrofit_experiment  # noqa: E402  (sections of other parts)

for _section in (kv.kv_section, retrofit.retrofit_section, retrofit_experiment.experiment_section):
    register_section(_section)


def split_table(table: pd.DataFrame, keys: tuple[str, ...] = ("arm", "scheme")) -> list[str]:
    """A wide arm x scheme table as two: the degradation, then the probes and task columns."""
    first = [c for c in table.columns if c in keys + ("n_seeds", "n_draws", "fp_ppl", "ppl", "rel_delta_%", "kl",
                                                      "top1_agreement", "ppl_std_draws")]
    rest = [c for c in table.columns if c not in first]
    out = [markdown_table(table[first])]
    if rest:
        out += ["", "The same rows: probes measured under the scheme, and the downstream task:", "",
                markdown_table(table[list(keys) + rest])]
    return out


def write_study(store: ResultStore, out: Path, models_dir: Path, quick: bool = False,
                discussion: Path | None = None, coverage: bool = True, readme: Path | None = None) -> Path:
    """STUDY.md (STUDY_QUICK.md) and its plots from the store, computing nothing; `coverage`: how many
    of the plan's cells it holds; `readme`: also its generated results text (qbench/study/prose.py)."""
    out = Path(out)
    p = plan(quick)
    records = store.records()
    full, long = split_protocols(comparison_table(records), p.limit)
    ctx = StudyContext(store=store, records=records, out=out, models_dir=Path(models_dir), plan=p, quick=quick,
                       full=full, long=long, facts=Facts(records, Path(models_dir)), discussion=discussion,
                       coverage=study_coverage(store, quick) if coverage else None)
    lines: list[str] = []
    for section in SECTIONS:
        lines += section(ctx)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("STUDY_QUICK.md" if quick else "STUDY.md")
    atomic_write_text(path, "\n".join(lines))
    if readme is not None:
        from qbench.study.prose import write_readme

        write_readme(ctx.facts, Path(readme))
    return path
