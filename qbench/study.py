"""The study (`make study`, `qbench study`): run the study's cells into the result store
(skipping those already there) and write results/STUDY.md from the store and the
checkpoints' mechanism logs only.  `--quick` is a small variant that exercises every
part of the pipeline in a few minutes (CI smoke test).

Parts:
1. Bigram-Backcopy mechanism: the Attn_s / Val_s / Delta-logit_s curves logged while the
   `bb` checkpoints trained (models/bb-*/mechanism_log.csv), per arm with seed bands.
2. The tiny zoo: every arm x scheme, calibration draws 0-2, ppl + probes (+ tasks),
   mean +/- std over training seeds and calibration draws.
3. SmolLM2-135M: its extreme tokens and its degradation per scheme.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from qbench.modeling.attention import ATTENTION_ARMS
from qbench.report import REFERENCE_SCHEME, _markdown, comparison_table
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

PUBLISHED = """| source | model | arm | FP ppl | W8A8 ppl | max inf-norm | avg kurtosis |
|---|---|---|---:|---:|---:|---:|
| Bondarenko T2 | OPT-125m | vanilla | 15.84 | 21.18 | 340 | 1778 |
| Bondarenko T2 | OPT-125m | gated (pi_init 0.25) | 15.55 | 16.02 | 8.7 | 18.9 |
| Bondarenko T2 | OPT-125m | clipped softmax | 16.29 | 37.20 | 63.2 | 19728 |
| VGA T2 | OPT-125m | vanilla | 15.95 | 43.78 | 658 (int8) | 6548 (int8) |
| VGA T2 | OPT-125m | IGA | 15.65 | 16.77 | 102 (int8) | 95 (int8) |
| VGA T2 | OPT-125m | VGA | 15.49 | 16.42 | 100 (int8) | 18.3 (int8) |"""


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


def run_study(store: ResultStore, quick: bool = False, progress: bool = True) -> list[dict]:
    from qbench.bench import run_bench
    from qbench.quant import get_scheme

    p = plan(quick)
    # Staged so that an interrupted run leaves the most useful records first: perplexity of
    # every arm x scheme at calibration draw 0 with the fp32 probes, the small preset, the
    # probes under each scheme, the downstream task, SmolLM2, then the other draws.
    run = functools.partial(run_bench, store=store, limit=p.limit, progress=progress, task_limit=p.task_limit)
    records = run(p.tiny_models, p.tiny_schemes, ["ppl"], calibration_seeds=p.calibration_seeds[:1])
    if "probes" in p.tiny_tasks:
        records += run(p.tiny_models, ["fp32"], ["probes"])
    if p.small_models:
        records += run(p.small_models, p.small_schemes, ["ppl"], calibration_seeds=[0])
        records += run(p.small_models, ["fp32"], ["probes"])
    if [t for t in p.tiny_tasks if t != "ppl"]:
        records += run(p.tiny_models, p.tiny_schemes, [t for t in p.tiny_tasks if t != "ppl"],
                       calibration_seeds=p.calibration_seeds[:1])
    if p.task_schemes:
        records += run(p.tiny_models, p.task_schemes, ["qbench_agreement"], calibration_seeds=[0])
    if p.smollm2:  # probes on fp32 only: the outliers every scheme faces
        records += run(["smollm2-135m"], p.smollm2_schemes, ["ppl"], calibration_seeds=[0])
        records += run(["smollm2-135m"], ["fp32"], ["probes"])
    if p.small_models:
        records += run(p.small_models, p.small_schemes, ["probes"], calibration_seeds=[0])
    if p.bb_models:  # the BB testbed at Guo et al.'s recipe: the copy circuit under every 8-bit scheme
        records += run(p.bb_models, BB_SCHEMES, ["ppl"], calibration_seeds=p.calibration_seeds)
    if p.ptq_schemes:  # SmolLM2 first (it has the outliers), every draw; then the CPU zoo at draw 0
        if p.smollm2:
            records += run(["smollm2-135m"], ["fp32"] + p.ptq_schemes, ["ppl"], calibration_seeds=p.calibration_seeds)
        records += run(p.tiny_models + p.small_models, p.ptq_schemes, ["ppl"], calibration_seeds=[0])
    calibrated = [s for s in p.tiny_schemes if "calibration_seed" in get_scheme(s).options]
    if len(p.calibration_seeds) > 1 and calibrated:
        records += run(p.tiny_models, calibrated, p.tiny_tasks, calibration_seeds=p.calibration_seeds[1:])
    if p.long_models:  # section 5: more text (about 19x the tokens of the short protocol per cell)
        records += run(p.long_models, LONG_SCHEMES, ["ppl"], limit=None, calibration_seeds=[0])
    if p.smollm2 and p.long_models:
        records += run(["smollm2-135m"], SMOLLM2_LONG_SCHEMES, ["ppl"], limit=SMOLLM2_LONG_LIMIT,
                       calibration_seeds=[0])
    return records


# -- part 1: mechanism curves -----------------------------------------------------------
def mechanism_logs(models_dir: Path, preset: str = "bb") -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """arm -> [(checkpoint, log frame)] for every checkpoint of `preset` with a mechanism log."""
    zoo = read_zoo()
    logs: dict[str, list] = {}
    for name, entry in zoo.items():
        folder = models_dir / str(entry.get("path", name))
        path = folder / "mechanism_log.csv"
        if entry.get("preset") == preset and path.exists():
            logs.setdefault(entry["arm"], []).append((name, pd.read_csv(path)))
    return logs


def _mean_std(values, digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}g} ± {std:.2g}"


def _logged_layers(column_sets) -> list[int]:
    """The layer indices of a mechanism log's per-layer columns (`attn_s_l<i>`)."""
    return sorted({int(c.rsplit("_l", 1)[1]) for columns in column_sets for c in columns if c.startswith("attn_s_l")})


def mechanism_table(logs) -> pd.DataFrame:
    rows = []
    for arm in sorted(logs, key=lambda a: BB_ARMS.index(a) if a in BB_ARMS else 99):
        finals = [frame.iloc[-1] for _, frame in logs[arm]]
        row = {"arm": arm, "seeds": len(finals), "step": int(finals[0]["step"])}
        for column in ("attn_s", "val_s", "val_s_ratio", "val_s_eff_ratio", "delta_logit_s", "gate_bos", "gate_others"):
            row[column] = _mean_std([f.get(column) for f in finals])
        # multi-layer models: the top-level columns are layer 0; the sink can form in any
        # layer, so every layer's Attn_s and value ratio (mean over seeds) follow
        layers = _logged_layers(f.index for f in finals)
        if len(layers) > 1:
            for column in ("attn_s", "val_s_ratio"):
                row[f"{column} by layer"] = " / ".join(
                    _mean_std([f.get(f"{column}_l{i}") for f in finals], 2).split(" ±")[0] for i in layers)
        rows.append(row)
    return pd.DataFrame(rows)


def mechanism_plot(logs, out: Path) -> Path | None:
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("attn_s", "Attn_s: attention on BOS (non-trigger queries)"),
              ("val_s_ratio", "Val_s: ||V_BOS|| / mean ||V_j||"),
              ("val_s_eff_ratio", "gated value ||g V_BOS|| / mean (vga)"),
              ("delta_logit_s", "Delta-logit_s: BOS score - mean score")]
    # one row of panels per layer for deeper models (their `<metric>_l<i>` columns)
    layers = _logged_layers(f.columns for runs in logs.values() for _, f in runs)
    suffixes = [f"_l{i}" for i in layers] if len(layers) > 1 else [""]
    fig, grid = plt.subplots(len(suffixes), len(panels), figsize=(4.2 * len(panels), 3.4 * len(suffixes)),
                             squeeze=False)
    colors = {arm: f"C{i}" for i, arm in enumerate(sorted(logs, key=lambda a: (a not in BB_ARMS, BB_ARMS.index(a)
                                                                                if a in BB_ARMS else 0, a)))}
    cells = [(ax, column + suffix, title + (f" [layer {suffix[2:]}]" if suffix else ""))
             for axes, suffix in zip(grid, suffixes) for ax, (column, title) in zip(axes, panels)]
    for ax, column, title in cells:
        for arm, runs in logs.items():
            frames = [f for _, f in runs if column in f and f[column].notna().any()]
            if not frames:
                continue
            joined = pd.concat([f.set_index("step")[column] for f in frames], axis=1)
            line = ax.plot(joined.index, joined.mean(axis=1), label=f"{arm} (n={len(frames)})", color=colors[arm])[0]
            if len(frames) > 1:
                ax.fill_between(joined.index, joined.min(axis=1), joined.max(axis=1), alpha=0.2,
                                color=line.get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        if column.startswith(("val_s_ratio", "val_s_eff_ratio")) and ax.lines:
            ax.set_yscale("log")
    grid[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# Guo et al. (2024), Fig. 2/3: the 1-layer softmax model at their recipe (10,000 steps x 512)
# ends with nearly all non-trigger attention on BOS and a BOS value norm near zero (read off
# their curves: approximate values, for direction).
GUO_PUBLISHED = {"arm": "softmax (Guo et al., published)", "seeds": "-", "step": 10000, "attn_s": "~1",
                 "val_s": "-", "val_s_ratio": "~0", "val_s_eff_ratio": "-", "delta_logit_s": "large (> 0)",
                 "gate_bos": "-", "gate_others": "-"}
BB_GUO_PRESETS = ["bb-guo-cpu", "bb3-guo-cpu", "bb-guo", "bb3-guo"]
BB_SCHEMES = ["fp32", "w8a8-pt", "w8a8-dyn", "w8a8-attn", "w6a6", "w4a8", "llm-int8-t0"]


def bb_records_frame(records: list[dict], models: list[str]) -> pd.DataFrame:
    """One row per BB ppl record of `models`: the copy-circuit and bigram metrics, the
    sink indicators and the largest residual peak over layers."""
    rows = []
    for r in records:
        if r.get("task") != "ppl" or r.get("model") not in models or r.get("status") != "ok":
            continue
        m = r["metrics"]
        if m.get("copy_acc") is None:
            continue
        mech = m.get("mechanism") or {}
        per_layer = [x.get("attn_s") for x in m.get("mechanism_per_layer") or [] if x.get("attn_s") is not None]
        peaks = m.get("residual_peak_per_layer") or []
        rows.append({"model": r["model"], "scheme": r["scheme"], "draw": r.get("calibration_seed"),
                     "ppl": m["ppl"], "copy_acc": m["copy_acc"], "copy_loss": m["copy_loss"],
                     "bigram_acc": m["bigram_acc"], "bigram_loss": m["bigram_loss"],
                     "copy_positions": m.get("copy_positions"),
                     "attn_s": max(per_layer) if per_layer else mech.get("attn_s"),  # the sink's layer
                     "residual_peak": max(peaks) if peaks else None})
    return pd.DataFrame(rows)


def bb_quant_tables(records: list[dict], models: list[str], schemes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per arm x scheme: copy/bigram deltas against each checkpoint's fp32, mean ± std over
    training seeds of the per-checkpoint mean over calibration draws;
    per checkpoint: fp32 residual peak and sink (attn_s) beside its worst copy-accuracy drop)."""
    frame = bb_records_frame(records, models)
    if frame.empty or "fp32" not in set(frame.scheme):
        return pd.DataFrame(), pd.DataFrame()
    zoo = read_zoo()
    frame = frame.assign(draw=1)  # one row per record: the sum counts the calibration draws
    per = frame.groupby(["model", "scheme"], as_index=False).agg(
        {c: "mean" for c in ("ppl", "copy_acc", "copy_loss", "bigram_acc", "bigram_loss", "attn_s",
                             "residual_peak")} | {"draw": "sum"})
    fp = per[per.scheme == "fp32"].set_index("model")
    per = per[per.model.isin(fp.index)]
    for column in ("copy_acc", "copy_loss", "bigram_loss", "ppl"):
        per[f"d_{column}"] = [v - fp.loc[m, column] for m, v in zip(per.model, per[column])]
    per["arm"] = [zoo.get(m, {}).get("arm", m) for m in per.model]
    rows = []
    order = {s: i for i, s in enumerate(schemes)}
    for (arm, scheme), group in per[per.scheme.isin(schemes)].groupby(["arm", "scheme"]):
        rows.append({"arm": arm, "scheme": scheme, "n_seeds": group.model.nunique(), "n_draws": int(group.draw.max()),
                     "copy_acc": _mean_std(list(group.copy_acc), 4),
                     "Δcopy_acc": _mean_std(list(group.d_copy_acc), 2),
                     "Δcopy_loss": _mean_std(list(group.d_copy_loss), 2),
                     "Δbigram_loss": _mean_std(list(group.d_bigram_loss), 2),
                     "sink attn_s": _mean_std(list(group.attn_s), 3),
                     "residual peak": _mean_std(list(group.residual_peak), 3)})
    by_arm = pd.DataFrame(rows)
    if not by_arm.empty:
        by_arm = by_arm.sort_values(["scheme", "arm"], key=lambda c: c.map(order) if c.name == "scheme" else c)
    quant = per[per.scheme != "fp32"]
    worst = quant.groupby("model").agg(worst_d_copy_acc=("d_copy_acc", "min"),
                                       worst_scheme=("d_copy_acc", lambda v: quant.loc[v.idxmin(), "scheme"]))
    checkpoints = pd.DataFrame({"checkpoint": fp.index, "arm": [zoo.get(m, {}).get("arm", m) for m in fp.index],
                                "fp32 copy_acc": fp.copy_acc.round(4).values,
                                "fp32 sink attn_s": fp.attn_s.round(3).values,
                                "fp32 residual peak": fp.residual_peak.round(2).values})
    checkpoints = checkpoints.merge(worst, left_on="checkpoint", right_index=True, how="left")
    checkpoints.loc[checkpoints.worst_d_copy_acc >= 0, "worst_scheme"] = "- (no drop)"
    return by_arm, checkpoints.sort_values(["arm", "checkpoint"])


# -- part 2/3: quantization tables ------------------------------------------------------
STUDY_COLUMNS = ["ppl", "delta_ppl", "rel_delta_%", "kl", "top1_agreement", "max_inf_norm", "kurtosis",
                 "sink_rate@0.3", "agreement_acc", "agreement_flip_rate"]


def arm_label(name: str, entry: dict) -> str:
    """The arm, plus the step count where a checkpoint trained longer than its preset's
    usual run (small-*-3k), so that such runs get their own rows."""
    arm = entry.get("arm", name)
    return f"{arm} ({entry['steps']} steps)" if name.endswith("-3k") and "steps" in entry else arm


def arm_table(table: pd.DataFrame, models: list[str], schemes: list[str]) -> pd.DataFrame:
    """Rows (arm, scheme): mean ± std over the arm's checkpoints (training seeds) of the
    per-checkpoint values, which are themselves means over calibration draws; `n_seeds`,
    `n_draws`, and the calibration-draw std of ppl."""
    zoo = read_zoo()
    frame = table[table.model.isin(models) & (table.status == "ok") & table.scheme.isin(schemes)].copy()
    if frame.empty:
        return frame
    # one row per checkpoint and scheme (the table already averages calibration draws)
    frame = frame.groupby(["model", "scheme"], as_index=False, sort=False).agg(
        {c: "mean" if pd.api.types.is_numeric_dtype(frame[c]) else "first"
         for c in frame.columns if c not in ("model", "scheme")})
    frame["arm"] = [arm_label(m, zoo.get(m, {})) for m in frame.model]
    fp = frame[frame.scheme == REFERENCE_SCHEME].set_index("model")["ppl"]
    rows = []
    for (arm, scheme), group in frame.groupby(["arm", "scheme"], sort=False):
        row = {"arm": arm, "scheme": scheme, "n_seeds": group.model.nunique(), "n_draws": int(group["n"].max()),
               "fp_ppl": _mean_std([fp.get(m) for m in group.model], 4)}
        for column in STUDY_COLUMNS:
            if column in group:
                row[column] = _mean_std(list(group[column]), 4 if column == "ppl" else 3)
        draws = [v for v in group["ppl_std"] if isinstance(v, float) and not math.isnan(v)]
        row["ppl_std_draws"] = f"{max(draws):.2g}" if draws else "-"
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(schemes)}
    return out.sort_values(["scheme", "arm"], key=lambda c: c.map(order) if c.name == "scheme" else c)


def ptq_table(table: pd.DataFrame, rows: list[tuple[str, list[str]]]) -> pd.DataFrame:
    """The table of the PTQ section: one row per (label, checkpoints), one column per
    method; cells are the relative perplexity change in %, mean ± std over the checkpoints
    (training seeds) of each checkpoint's mean over calibration draws, or, for a single
    checkpoint, ± the std over its calibration draws; `(n)` counts seeds x draws."""
    frame = table[(table.status == "ok")]
    out = []
    for label, models in rows:
        row = {"model / arm": label}
        for column, scheme in PTQ_COLUMNS:
            cells = frame[frame.model.isin(models) & (frame.scheme == scheme)]
            if cells.empty:
                row[column] = "-"
                continue
            values = list(cells["rel_delta_%"])
            draws = int(cells["n"].max())
            if len(values) == 1:
                std = cells["ppl_std"].iloc[0]
                fp = cells["ppl"].iloc[0] - cells["delta_ppl"].iloc[0]
                spread = (f" ± {100 * std / fp:.2g}" if isinstance(std, float) and not math.isnan(std) and draws > 1
                          else "")
                value = f"{values[0]:+.0f}" if abs(values[0]) >= 100 else f"{values[0]:+.3g}"
                row[column] = f"{value}{spread} ({draws})"
            else:
                row[column] = f"{_mean_std(values, 3)} ({len(values)}x{draws})"
        out.append(row)
    return pd.DataFrame(out)


def split_protocols(full: pd.DataFrame, limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows of sections 2-4: text perplexity on the study's short protocol, the first
    `limit` characters, and the rows of other protocols such as BB's; the text-perplexity
    rows on more text: the whole test split, SmolLM2's longer prefix).  Tables never
    average over protocols: a model's cells under two protocols are different numbers."""
    if full.empty:
        return full, full
    protocol = full.protocol.astype(str)
    long = protocol.str.startswith("nonoverlap") & ~protocol.str.endswith(f"-first{limit}c")
    return full[~long], full[long]


def more_text_table(short: pd.DataFrame, long: pd.DataFrame, models: list[str], schemes: list[str]) -> pd.DataFrame:
    """Rows (arm, scheme) over the checkpoints of `models` measured on a long protocol: the
    relative perplexity change, KL and top-1 there (mean ± std over training seeds), beside
    the relative change of the same checkpoints on the short protocol (mean over its draws)."""
    measured = long[long.model.isin(models) & (long.status == "ok")]
    if measured.empty:
        return pd.DataFrame()
    checkpoints = sorted(set(measured.model))
    long_table = arm_table(measured, checkpoints, schemes)
    short_table = arm_table(short, checkpoints, schemes) if not short.empty else pd.DataFrame()
    tokens = measured.groupby("model")["tokens"].max()
    out = long_table[["arm", "scheme", "n_seeds", "fp_ppl", "rel_delta_%", "kl", "top1_agreement"]].copy()
    out.insert(3, "tokens", int(tokens.min()) if tokens.min() == tokens.max() else f"{tokens.min()}-{tokens.max()}")
    short_rel = ({(a, sc): v for a, sc, v in zip(short_table.arm, short_table.scheme, short_table["rel_delta_%"])}
                 if not short_table.empty else {})
    out["rel_delta_% short"] = [short_rel.get((a, sc), "-") for a, sc in zip(out.arm, out.scheme)]
    return out[out.scheme != REFERENCE_SCHEME].reset_index(drop=True)


def degradation_plot(table: pd.DataFrame, models: list[str], schemes: list[str], out: Path,
                     title: str) -> Path | None:
    """Bars of relative perplexity change per scheme and arm: mean over the arm's training
    seeds (each a mean over calibration draws), whiskers the min and max over seeds."""
    frame = table[table.model.isin(models) & (table.status == "ok") & table.scheme.isin(schemes)
                  & (table.scheme != REFERENCE_SCHEME)]
    if frame.empty or "rel_delta_%" not in frame:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoo = read_zoo()
    per_model = frame.groupby(["model", "scheme"], as_index=False)["rel_delta_%"].mean()
    per_model["arm"] = [arm_label(m, zoo.get(m, {})) for m in per_model.model]
    stats = per_model.groupby(["arm", "scheme"])["rel_delta_%"].agg(["mean", "min", "max"])
    arms = sorted(per_model.arm.unique())
    order = [s for s in schemes if s in set(per_model.scheme)]
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(order)), 3.6))
    for i, arm in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for j, scheme in enumerate(order):
            if (arm, scheme) in stats.index:
                row = stats.loc[(arm, scheme)]
                xs.append(j + (i - (len(arms) - 1) / 2) * width)
                ys.append(row["mean"])
                lo.append(row["mean"] - row["min"])
                hi.append(row["max"] - row["mean"])
        ax.bar(xs, ys, width, yerr=[lo, hi], label=arm, capsize=2)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylabel("perplexity change vs fp32 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def extreme_token_table(store: ResultStore, models: list[str]) -> pd.DataFrame:
    """Per arm, from the fp32 probe records: sink rate, first-token share, outliers, and the
    value drain (||V_0|| / mean ||V_j||, smallest over layers) with the gates at token 0."""
    zoo = read_zoo()
    rows = []
    for r in store.records():
        if (r["model"] not in models or r["task"] != "probes" or r["scheme"] != REFERENCE_SCHEME
                or r.get("status") != "ok"):
            continue
        m = r["metrics"]
        values = m.get("value_norm_ratio_per_layer") or []
        gates, others = m.get("gate_at_sink_token"), m.get("gate_at_other_tokens")
        rows.append({"arm": arm_label(r["model"], zoo.get(r["model"], {})), "model": r["model"],
                     "sink_rate@0.3": m.get("sink_rate@0.3"), "first_token_share": m.get("first_token_share_mean"),
                     "max_inf_norm": m.get("max_inf_norm"), "kurtosis_max": m.get("kurtosis_max"),
                     "value_ratio_min": min(values) if values else None,
                     "gate_token0": sum(gates) / len(gates) if gates else None,
                     "gate_others": sum(others) / len(others) if others else None})
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).drop_duplicates("model", keep="last")
    out = []
    for arm, group in frame.groupby("arm", sort=True):
        row = {"arm": arm, "n_seeds": len(group)}
        for column in frame.columns[2:]:
            values = [v for v in group[column] if v is not None and not pd.isna(v)]
            row[column] = _mean_std(values, 3) if values else "-"
        out.append(row)
    return pd.DataFrame(out)


def smollm2_probe_summary(store: ResultStore) -> tuple[pd.DataFrame, list[float] | None]:
    rows, share = [], None
    for r in store.records():
        if r["model"] != "smollm2-135m" or r["task"] != "probes" or r.get("status") != "ok":
            continue
        m = r["metrics"]
        rows.append({"scheme": r["scheme"], "sink_rate@0.3": m.get("sink_rate@0.3"),
                     "massive_activation_max": m.get("massive_activation_max"),
                     "max_activation_position": m.get("max_activation_position"),
                     "massive_activations": m.get("massive_activations"),
                     "outlier_features": m.get("outlier_features"), "max_inf_norm": m.get("max_inf_norm"),
                     "kurtosis_mean": m.get("kurtosis_mean")})
        if r["scheme"] == REFERENCE_SCHEME:
            share = m.get("first_token_share_per_layer")
    return pd.DataFrame(rows), share


def _extremes_and_plot(store: ResultStore, full: pd.DataFrame, models: list[str], schemes: list[str], out: Path,
                       name: str, intro: str, title: str) -> list[str]:
    """The extreme-token table and the degradation plot of one group of checkpoints."""
    lines = []
    extreme = extreme_token_table(store, models)
    if not extreme.empty:
        lines += [intro, "", _markdown(extreme), ""]
    plot = degradation_plot(full, models, schemes, out / "plots" / f"{name}_degradation.png", title)
    if plot is not None:
        lines += [f"![{name} degradation]({plot.relative_to(out)})", ""]
    return lines


def more_text_section(short: pd.DataFrame, long: pd.DataFrame, p: StudyPlan) -> list[str]:
    """Section 5: the schemes of LONG_SCHEMES on the whole test split (tiny, small) and
    SmolLM2 on its longer prefix, beside the short protocol's numbers for the same cells."""
    lines = ["## 5. On more text", ""]
    groups = [("tiny", p.tiny_models), ("small", p.small_models)]
    tables = [(name, more_text_table(short, long, [m for m in p.long_models if m in models], LONG_SCHEMES))
              for name, models in groups]
    tables = [(name, t) for name, t in tables if not t.empty]
    smol_long = long[(long.model == "smollm2-135m") & (long.status == "ok")
                     & long.protocol.str.endswith(f"-first{SMOLLM2_LONG_LIMIT}c")]
    if not tables and smol_long.empty:
        return lines + ["No records on more text yet (`make study` runs them last).", ""]
    protocol = next((t for t in long.protocol if t.startswith("nonoverlap") and "-first" not in t), "-")
    lines += [f"The short protocol (sections 2-4) reads the first {p.limit:,} characters of the test split "
              f"(about 5,300 tokens for the zoo's tokenizer, 4,300 for SmolLM2's). Here the zoo is measured on "
              f"the whole test split (`{protocol}`) and SmolLM2 on its first {SMOLLM2_LONG_LIMIT:,} characters, "
              "calibration draw 0. `rel_delta_%`, KL and top-1 are on the long protocol, mean ± std over the "
              "checkpoints measured (`n_seeds`); `rel_delta_% short` is the same checkpoints on the short "
              "protocol (mean over its calibration draws).", ""]
    for name, table in tables:
        lines += [f"{name}:", "", _markdown(table), ""]
    if not smol_long.empty:
        short_smol = short[(short.model == "smollm2-135m") & (short.status == "ok")].set_index("scheme")
        rows = smol_long[smol_long.scheme.isin(SMOLLM2_LONG_SCHEMES)].copy()
        rows["rel_delta_% short"] = [short_smol["rel_delta_%"].get(sc, float("nan")) for sc in rows.scheme]
        rows["tokens"] = rows["tokens"].astype(int)
        columns = ["scheme", "tokens", "ppl", "rel_delta_%", "kl", "top1_agreement", "rel_delta_% short"]
        order = {sc: i for i, sc in enumerate(SMOLLM2_LONG_SCHEMES)}
        rows = rows.sort_values("scheme", key=lambda c: c.map(order))
        lines += ["SmolLM2-135M:", "", _markdown(rows[columns]), ""]
    return lines


def write_study(store: ResultStore, out: Path, models_dir: Path, quick: bool = False,
                discussion: Path | None = None) -> Path:
    out = Path(out)
    plots = out / "plots"
    p = plan(quick)
    logs = mechanism_logs(models_dir)
    lines = ["# qbench study: does VGA keep transformers quantizable, at CPU scale?", "",
             "Generated by `make study` (`qbench study`) from the result store and the checkpoints' "
             "mechanism logs only; every number below is a record in `results/records/` or a row of a "
             "`models/bb-*/mechanism_log.csv`." + (" **QUICK variant** (pipeline smoke test)." if quick else ""),
             "", "## 1. Mechanism: Bigram-Backcopy (Guo et al. 2024)", ""]
    table = mechanism_table(logs)
    if table.empty:
        lines.append("No bb checkpoint with a mechanism log in the zoo.")
    else:
        lines += [f"Final values (step {table.step.iloc[0]}) on 64 fixed sequences, mean ± std over training "
                  "seeds (`seeds`). Recipe: `bb` preset (1 layer, 1 head, width 256, batch 128, 1,000 steps; "
                  "the original used batch 512 and 10,000 steps).", "", _markdown(table), ""]
        plot = mechanism_plot(logs, plots / "mechanism_curves.png")
        lines += [f"![mechanism curves]({plot.relative_to(out)})", ""]
    records = store.records()
    for preset in BB_GUO_PRESETS:
        guo_logs = mechanism_logs(models_dir, preset)
        if not guo_logs:
            continue
        guo = pd.concat([mechanism_table(guo_logs), pd.DataFrame([GUO_PUBLISHED])], ignore_index=True)
        entry = next(e for e in read_zoo().values() if e.get("preset") == preset)
        lines += [f"### 1b. At Guo et al.'s recipe: `{preset}`", "",
                  f"Preset `{preset}` ({entry.get('steps', '?')} steps; `qbench list presets` gives the whole "
                  "recipe: AdamW betas (0.9, 0.99), weight decay 1e-4, constant 3e-4, no warm-up, no clipping). "
                  "Final values, mean ± std over training seeds; the last row is Guo et al.'s 1-layer run "
                  "(10,000 x 512), read off their figures.", "", _markdown(guo), ""]
        plot = mechanism_plot(guo_logs, plots / f"mechanism_curves_{preset}.png")
        if plot is not None:
            lines += [f"![mechanism curves {preset}]({plot.relative_to(out)})", ""]
        models = [name for name, e in read_zoo().items() if e.get("preset") == preset]
        by_arm, checkpoints = bb_quant_tables(records, models, BB_SCHEMES)
        if not by_arm.empty:
            lines += [f"Under quantization (BB protocol: 64 sequences of 64 tokens; the copy circuit is the "
                      "positions right after a trigger, the rest are bigram positions). Δ = quantized minus the "
                      "same checkpoint's fp32; accuracies are fractions, losses nats per token; mean ± std over "
                      "training seeds of each checkpoint's mean over calibration draws (`n_draws`). Sink "
                      "attn_s (the largest over layers) and residual peak (max |h| at BOS over the median |h|, "
                      "the largest over layers) "
                      "are measured on the model as it computes under the scheme.", "", _markdown(by_arm), "",
                      "Per checkpoint: its fp32 extreme-token indicators beside its largest copy-accuracy drop "
                      "over the schemes above:", "", _markdown(checkpoints), ""]
    every = comparison_table(records)
    full, long = split_protocols(every, p.limit)  # sections 2-4: the short protocol; 5: more text
    lines += ["## 2. The tiny zoo under every scheme", ""]
    tiny = arm_table(full, p.tiny_models, p.tiny_schemes) if not full.empty else pd.DataFrame()
    if tiny.empty:
        lines.append("No records yet.")
    else:
        lines += [f"Perplexity protocol `{full[full.model.isin(p.tiny_models)].protocol.iloc[0]}`; calibrated "
                  f"schemes averaged over calibration draws {p.calibration_seeds}; `ppl_std_draws` is the largest "
                  "std over draws of one checkpoint. Published rows (OPT-125m, for direction only):", "",
                  PUBLISHED, "", _markdown(tiny), ""]
        lines += _extremes_and_plot(store, full, p.tiny_models, p.tiny_schemes, out, "tiny",
                                    "Extreme tokens at fp32 (probe records; mean ± std over training seeds; "
                                    "`value_ratio_min` is the smallest over layers of ||V_0|| / mean ||V_j||; "
                                    "gates are the mean gate value at token 0 and at the other tokens, for gated "
                                    "arms):", "tiny zoo: perplexity change per scheme (bars: mean over seeds; "
                                    "whiskers: min-max)")
    if p.small_models:
        lines += ["## 2b. The small preset: the same architecture, 16x the training tokens (GPU)", ""]
        small = arm_table(full, p.small_models, p.small_schemes) if not full.empty else pd.DataFrame()
        if small.empty:
            lines.append("No records yet.")
        else:
            lines += ["Trained on an H200 (`scripts/gpu_zoo.py`, log in `study/gpu_zoo.log`): tiny's architecture "
                      "and tokenizer, batch 256 x 256 tokens, 1,000 steps (65.5M tokens, about 24 passes over "
                      "the 2.7M-token training split), bf16 autocast, weights stored bf16. The `(3000 steps)` "
                      "rows ran three times longer and overfit (validation ppl about 250 against 55): they "
                      "show what longer training does to extreme tokens, not a better model. "
                      "Calibration draw 0 only.", "", _markdown(small), ""]
            lines += _extremes_and_plot(store, full, p.small_models, p.small_schemes, out, "small",
                                        "Extreme tokens at fp32 (as for the tiny zoo):",
                                        "small preset: perplexity change per scheme")
    if p.smollm2:
        lines += ["## 3. SmolLM2-135M (pretrained, from its GGUF)", ""]
        smol = full[full.model == "smollm2-135m"] if not full.empty else pd.DataFrame()
        if smol.empty:
            lines.append("No records yet.")
        else:
            columns = [c for c in ["scheme", "n", "ppl", "delta_ppl", "rel_delta_%", "kl", "top1_agreement",
                                   "max_inf_norm", "kurtosis", "sink_rate@0.3"] if c in smol]
            lines += [f"Protocol `{smol.protocol.iloc[0]}`.", "", _markdown(smol[columns]), ""]
        probes, share = smollm2_probe_summary(store)
        if not probes.empty:
            lines += ["Extreme tokens (probes, 64 windows of T = 64):", "", _markdown(probes), ""]
        if share:
            lines += ["fp32 first-token attention share per layer: "
                      + ", ".join(f"{i}: {v:.2f}" for i, v in enumerate(share)), ""]
    if p.ptq_schemes and not full.empty:
        lines += ["## 4. Outlier-aware PTQ", ""]
        zoo = read_zoo()
        rows = [("smollm2-135m", ["smollm2-135m"])]
        arms: dict[str, list[str]] = {}
        for name in p.tiny_models:
            arms.setdefault(f"tiny {arm_label(name, zoo.get(name, {}))}", []).append(name)
        for name in p.small_models:
            arms.setdefault(f"small {arm_label(name, zoo.get(name, {}))}", []).append(name)
        rows += list(arms.items())
        ptq = ptq_table(full, rows)
        lines += ["Relative perplexity change against fp32 (%), same protocol as the sections above. SmolLM2: "
                  "mean ± std over calibration draws (n). Zoo rows: mean ± std over training seeds of each "
                  "checkpoint's mean over its calibration draws (the new methods: draw 0), `(seeds x draws)`. SmoothQuant (alpha 0.5) and the Hadamard "
                  "rotation are folded into the float model before the named quantizers; GPTQ / AWQ / HQQ are "
                  "4-bit weight-only, compared with round-to-nearest at the same group size. "
                  "`w8a8-had` draws are different random Hadamard signs.", "", _markdown(ptq), ""]
        smol = full[(full.model == "smollm2-135m") & (full.status == "ok")
                    & full.scheme.isin(["fp32"] + p.ptq_schemes)].copy()
        if not smol.empty:
            order = {s: i for i, s in enumerate(["fp32"] + p.ptq_schemes)}
            smol = smol.sort_values("scheme", key=lambda c: c.map(order))
            columns = [c for c in ["scheme", "n", "ppl", "ppl_std", "rel_delta_%", "kl", "top1_agreement",
                                   "agreement_acc", "agreement_flip_rate"] if c in smol]
            lines += ["SmolLM2 in detail (`n` calibration draws; `ppl_std` over them; KL and top-1 against fp32 "
                      "on the same tokens; `qbench_agreement` on 200 items at draw 0 where measured):", "",
                      _markdown(smol[columns]), ""]
        sweep = full[(full.model == "smollm2-135m") & (full.status == "ok")
                     & full.scheme.isin(["w8a8-sq-a25", "w8a8-sq", "w8a8-sq-a75", "w8a8-sq-a85"])]
        if len(sweep) > 1:
            alpha = {"w8a8-sq-a25": 0.25, "w8a8-sq": 0.5, "w8a8-sq-a75": 0.75, "w8a8-sq-a85": 0.85}
            sweep = sweep.assign(alpha=[alpha[x] for x in sweep.scheme]).sort_values("alpha")
            lines += ["SmoothQuant's alpha on SmolLM2 (then `w8a8-dyn`; relative perplexity change, %): "
                      + ", ".join(f"alpha {a}: {v:+.2f} (n={n})" for a, v, n in
                                  zip(sweep.alpha, sweep["rel_delta_%"], sweep["n"])), ""]
    if p.long_models and not every.empty:
        lines += more_text_section(full, long, p)
    if discussion is not None and Path(discussion).exists():
        lines += [Path(discussion).read_text().strip(), ""]
    lines += ["## Regenerate", "", "```", "make study            # runs the missing cells, then writes this file",
              "make study QUICK=1    # the pipeline on bb-softmax/bb-vga only (minutes)",
              "python scripts/train_queue.py --queue bb --worker 0/2   # (and 1/2) the bb checkpoints",
              "python scripts/train_queue.py --queue tiny              # tiny checkpoints, CPU (hours)",
              "python scripts/gpu_zoo.py train --work /tmp/gpu_zoo --out OUT --budget 420   # on a CUDA machine:",
              "python scripts/gpu_zoo.py unpack OUT                    #   small-* and tiny seeds, then here",
              "qbench zoo                                              # re-measure models/zoo.yaml",
              "```", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("STUDY_QUICK.md" if quick else "STUDY.md")
    path.write_text("\n".join(lines))
    return path
