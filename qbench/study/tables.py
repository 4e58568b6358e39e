"""Parts 2-5 of the study: the quantization tables and plots of the zoo and SmolLM2."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from qbench.report import REFERENCE_SCHEME
from qbench.results import ResultStore
from qbench.study.plan import PTQ_COLUMNS
from qbench.zoo import read_zoo


def mean_std(values, digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}g} ± {std:.2g}"



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
               "fp_ppl": mean_std([fp.get(m) for m in group.model], 4)}
        for column in STUDY_COLUMNS:
            if column in group:
                row[column] = mean_std(list(group[column]), 4 if column == "ppl" else 3)
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
                row[column] = f"{mean_std(values, 3)} ({len(values)}x{draws})"
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
            row[column] = mean_std(values, 3) if values else "-"
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

