"""STUDY.md section "Retrofit into SmolLM2": each retrofitted arm and the control against
the original SmolLM2, from the records (nothing is computed here).

Models are named `smollm2-rf-[<recipe>-]<arm>-s<seed>` (the zoo's retrofit entries); the
original is `smollm2-135m`.  The decision rule was written before the runs (issue 22): "arm
X retrofitted reduces the W8A8-pt loss" only if every X cell (fine-tune seeds x calibration
draws) lies below every control cell; the same for the massive activation.  Anything else
is reported as it is.
"""
from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

BASE = "smollm2-135m"
SCHEMES = ["w8a8-pt", "w8a8-dyn", "w8a8-sq", "w8a8-had", "llm-int8", "w4-rtn-g64", "nf4", "w8a8-attn"]
PRIMARY = "w8a8-pt"
PROTOCOL = "nonoverlap-w256-bos-sotu-test-first20000c"
NAME = re.compile(r"smollm2-rf-(?!h[12]-)(?:(?P<recipe>[a-z0-9]+)-)?(?P<arm>softmax|vga_out|vga_x|vga|qwen_g1|sink_logit)"
                  r"-s(?P<seed>\d+)$")
PROBES = [("massive_activation_max", "massive act."), ("sink_rate@0.3", "sink rate@0.3 %"),
          ("first_token_share_mean", "attn on BOS"), ("kurtosis_mean", "kurtosis"),
          ("gate_at_sink_token", "gate at BOS"), ("gate_at_other_tokens", "gate elsewhere")]


def parse(name: str) -> dict | None:
    found = NAME.fullmatch(name)
    return None if found is None else {"recipe": found["recipe"] or "main", "arm": found["arm"],
                                       "seed": int(found["seed"])}


def _cells(records: list[dict]) -> dict:
    """(model, scheme) -> [relative ppl change %, one per calibration draw]; (model, 'fp32') -> [ppl]."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("task") == "ppl" and r.get("protocol") == PROTOCOL
          and (r["model"] == BASE or parse(r["model"]))]
    fp = {r["model"]: r["metrics"]["ppl"] for r in ok if r["scheme"] == "fp32"}
    cells: dict = {(m, "fp32"): [p] for m, p in fp.items()}
    for r in ok:
        if r["scheme"] != "fp32" and r["model"] in fp:
            cells.setdefault((r["model"], r["scheme"]), []).append(100.0 * (r["metrics"]["ppl"] / fp[r["model"]] - 1))
    return cells


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.1f}"
    return f"{statistics.mean(values):+.1f} ± {statistics.stdev(values):.1f} (n={len(values)})"


def _probe(records: list[dict]) -> dict:
    out = {}
    for r in records:
        if r.get("status") == "ok" and r.get("task") == "probes" and r.get("scheme") == "fp32":
            m = r["metrics"]
            row = {}
            for key, _ in PROBES:
                value = m.get(key)
                if isinstance(value, list):  # per-layer gates: mean over layers
                    value = statistics.mean(value) if value else None
                row[key] = value
            out[r["model"]] = row
    return out


def decide(arm_cells: list[float], control_cells: list[float]) -> str:
    """The pre-registered rule: every arm cell below every control cell."""
    if not arm_cells or not control_cells:
        return "not measured"
    if max(arm_cells) < min(control_cells):
        return "reduces (every cell below every control cell)"
    return "not shown (the cells overlap or lie above the control's)"


def _extremes(arm: list[float], control: list[float], fmt: str) -> str:
    if not arm or not control:
        return "-"
    return f"{max(arm):{fmt}} / {min(control):{fmt}} ({len(arm)} vs {len(control)})"


def _verdict(arm: list[float], control: list[float], seeds: int) -> str:
    """The rule needs two fine-tune seeds; with fewer, cells that satisfy it are insufficient
    (the study's verdict, qbench/study/verdict.py, needs four)."""
    found = decide(arm, control)
    if seeds < 2 and found.startswith("reduces"):
        return "insufficient: every cell below, but 1 fine-tune seed"
    return found


def gate_dynamics(folder: Path) -> list[dict]:
    path = folder / "gate_log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pilot_tokens() -> str:
    from qbench.retrofit import RECIPES

    r = RECIPES["retrofit-pilot"]
    return (f"{r.trainable} trained, {r.steps} steps of {r.batch_size} x {r.context} tokens = "
            f"{r.steps * r.batch_size * r.context:,} tokens, one fine-tune seed")


def retrofit_section(records: list[dict], models_dir: Path | None = None) -> str:
    """The section's markdown, or "" when the store holds no retrofitted model."""
    from qbench.paths import models_dir as default_models

    models_dir = models_dir or default_models()
    cells = _cells(records)
    models = sorted({m for m, _ in cells if parse(m)}, key=lambda m: (parse(m)["recipe"], parse(m)["arm"], m))
    lines = ['## <a id="sr"></a>Retrofit into SmolLM2', ""]
    if not models:
        return ""  # no retrofit in this store: no section
    recipes = sorted({parse(m)["recipe"] for m in models})
    lines += [f"Each arm's parameters were added to every attention layer of SmolLM2-135M at their identity init "
              f"and fine-tuned on the sotu training split (`qbench retrofit`, recipes: {', '.join(recipes)}); the "
              f"`softmax` control has the same data order and steps and no new parameter. Relative perplexity "
              f"change (%) against each model's own fp32, protocol `{PROTOCOL}`; `a ± s (n=k)` is the mean and "
              f"sample standard deviation over k calibration draws. **Pilot** rows come from the CPU pilot "
              f"(`retrofit-pilot`: {_pilot_tokens()}): they check the pipeline and show the gates' "
              f"dynamics; they are not the experiment, and the decision rule needs two fine-tune seeds. "
              f"Under a gates-only recipe the control has nothing to train, so it is the original model: a gated "
              f"arm's fp32 change is what its gates learned on in-domain text, and its quantized change is "
              f"measured against its own fp32.", ""]
    header = ["model", "fp32 ppl", "fp32 vs original %"] + SCHEMES
    rows = [header, ["---"] * len(header)]
    base_ppl = (cells.get((BASE, "fp32")) or [None])[0]
    for m in [BASE] + models:
        ppl = (cells.get((m, "fp32")) or [None])[0]
        change = "-" if ppl is None or base_ppl is None else f"{100 * (ppl / base_ppl - 1):+.2f}"
        rows.append([m, "-" if ppl is None else f"{ppl:.3f}", change] + [_fmt(cells.get((m, s), [])) for s in SCHEMES])
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    probes = _probe(records)
    lines += ["Extreme-token indicators of the fp32 models (probes on 64 windows of 64 tokens): the largest "
              "activation in the residual stream, the share of heads putting >= 0.3 of their attention on the "
              "first token, the mean attention on it, the mean kurtosis of the residual stream, and each gated "
              "arm's gate (range (0, 2), 1 at init) at the first token and elsewhere, averaged over layers.", ""]
    header = ["model"] + [label for _, label in PROBES]
    rows = [header, ["---"] * len(header)]
    for m in [BASE] + models:
        row = probes.get(m, {})
        rows.append([m] + [("-" if row.get(k) is None else f"{row[k]:.4g}") for k, _ in PROBES])
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += ["Decision rule (written before the runs): arm X reduces the W8A8-pt loss only if every X cell lies "
              "below every control cell; the same for the massive activation.", ""]
    rows = [["recipe", "arm", "seeds", "W8A8-pt %: arm max / control min (cells)", "verdict (W8A8-pt)",
             "massive act.: arm max / control min", "verdict (massive act.)"], ["---"] * 7]
    for recipe in recipes:
        in_recipe = [m for m in models if parse(m)["recipe"] == recipe]
        control = [m for m in in_recipe if parse(m)["arm"] == "softmax"]
        control_cells = [c for m in control for c in cells.get((m, PRIMARY), [])]
        control_act = [probes[m]["massive_activation_max"] for m in control if m in probes]
        for arm in sorted({parse(m)["arm"] for m in in_recipe} - {"softmax"}):
            ms = [m for m in in_recipe if parse(m)["arm"] == arm]
            arm_cells = [c for m in ms for c in cells.get((m, PRIMARY), [])]
            act = [probes[m]["massive_activation_max"] for m in ms if m in probes]
            seeds = min(len({parse(m)["seed"] for m in ms}), len({parse(m)["seed"] for m in control}))
            rows.append([recipe, arm, str(seeds), _extremes(arm_cells, control_cells, "+.1f"),
                         _verdict(arm_cells, control_cells, seeds), _extremes(act, control_act, ".6g"),
                         _verdict(act, control_act, seeds)])
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    dyn = []
    for m in models:
        log = gate_dynamics(models_dir / m)
        if log and "gate_bos" in log[0]:
            first, last = log[0], log[-1]
            dyn.append([m, last["step"], f"{float(first['gate_bos']):.3f} -> {float(last['gate_bos']):.3f}",
                        f"{float(first['gate_others']):.3f} -> {float(last['gate_others']):.3f}",
                        f"{float(last['gate_bos_min_layer']):.3f}"])
        elif log and log[-1].get("sink_logit_max"):
            dyn.append([m, log[-1]["step"], "-", "-", f"sink logit max {float(log[-1]['sink_logit_max']):.2f}"])
    if dyn:
        lines += ["Gate dynamics during the fine-tune (two fixed training windows, `gate_log.csv` in each model "
                  "folder): mean gate at the first token and elsewhere over layers, from step 0 to the end, and the "
                  "lowest layer's mean gate at the first token.", ""]
        rows = [["model", "steps", "gate at BOS", "gate elsewhere", "lowest layer at BOS"], ["---"] * 5] + dyn
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return "\n".join(lines)


def retrofit_claim(records: list[dict]):
    """The claims table's row for "gating repairs a pretrained model by fine-tuning": the
    evidence text and its `Evidence` for the study's one verdict rule (qbench/study/verdict.py):
    key-side vga against the control, one unit per fine-tune seed (its mean over draws)."""
    from qbench.study.retrofit_experiment import endpoint_values, judge, units
    from qbench.study.verdict import Evidence

    values = endpoint_values(records)
    if units(values, "h1", "vga", "e_orig") and units(values, "h1", "softmax", "e_orig"):
        evidence, _ = judge(values, "h1", "vga", "e_orig")  # the trained control (issue 32)
        text = (f"SmolLM2 H1 (norms trained in both): vga E_orig {statistics.mean(evidence.arm):+.1f}% vs ctrl "
                f"{statistics.mean(evidence.reference):+.1f}% (margin {evidence.sensitivity:.2g})")
        return text, [evidence]
    cells = _cells(records)
    probes = _probe(records)
    arms: dict = {}
    for (m, scheme), values in cells.items():
        info = parse(m)
        if info and scheme == PRIMARY:
            arms.setdefault(info["arm"], {}).setdefault(info["seed"], []).extend(values)
    if "vga" not in arms or "softmax" not in arms:
        return "no retrofit records", [Evidence((), (), "lower", "SmolLM2 retrofit")]
    per_seed = {a: [statistics.mean(v) for v in arms[a].values()] for a in ("vga", "softmax")}
    acts = {a: [probes[m]["massive_activation_max"] for m in probes if (parse(m) or {}).get("arm") == a]
            for a in ("vga", "softmax")}
    text = (f"SmolLM2+vga pt {statistics.mean(per_seed['vga']):+.0f}% vs ctrl "
            f"{statistics.mean(per_seed['softmax']):+.0f}%")
    if acts["vga"] and acts["softmax"]:
        text += f"; massive act. {max(acts['vga']):.0f} vs {max(acts['softmax']):.0f}"
    return text, [Evidence(per_seed["vga"], per_seed["softmax"], "lower", "SmolLM2 retrofit")]