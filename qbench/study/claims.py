"""The first screen of STUDY.md: the papers' claims against our evidence, then one headline
row per arm.  Every number comes from `Facts`; every verdict from a rule stated here:

- supported / contradicted: the arm's range over its units (training seeds) lies wholly on
  the side the claim predicts / the other side, with >= 3 units on both sides;
- lead: the ranges separate but one side has fewer than 3 units (n = 2 ranks nothing);
- not separated: the ranges overlap;
- untested: we have no record that can test it (or the claim's premise, e.g. outliers to
  remove, is absent at our scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from qbench.study.published import OPT_VANILLA_INF_NORM
from qbench.study.facts import Facts, MissingValue, number, separation, stats

# The primary endpoint, stated once and used by the headline table and the claims.
PRIMARY_SCHEME = "w8a8-pt"
PRIMARY_ENDPOINT = ("relative perplexity change (%) under `w8a8-pt` (Bondarenko's per-tensor static W8A8) against the "
                    "same checkpoint's fp32, on the first 20,000 characters of the SOTU test split; per checkpoint "
                    "the mean over its calibration draws, then over training seeds")
SPREAD_DEFINITION = ("`a ± b (n)`: mean ± sample standard deviation over the n units named (training seeds, each "
                     "the mean over its calibration draws; for SmolLM2, calibration draws); `a to b`: smallest to "
                     "largest; a signed number is a change against fp32 (+ = worse)")
# Outliers "present": Bondarenko et al.'s vanilla OPT reaches max inf-norm 340; at most this
# much, a model has no outliers for an arm to remove (SmolLM2 has ~25,000).
OUTLIER_INF_NORM = 20.0
VERDICT_OF_SIDE = {"lower": "supported", "higher": "contradicted"}


def verdict(side: str, expected: str = "lower") -> str:
    if side.startswith("lead"):
        return "lead"
    if side == "no":
        return "not separated"
    if side == "untested":
        return "untested"
    return "supported" if side == expected else "contradicted"


@dataclass
class Claim:
    source: str
    text: str
    section: str
    evidence: Callable[[Facts], tuple[str, str, str]]  # -> (evidence, n, verdict)


def _c(s: dict, unit: str = "", signed: bool = False) -> str:
    """Compact `mean±std`, or the value for n = 1 (n goes in its own column)."""
    if not s.get("n"):
        raise MissingValue("no records")
    text = number(s["mean"], signed)
    return text + (f"±{number(s['std'], False, 2)}" if s.get("std") is not None else "") + unit


def _n(*sides: dict) -> str:
    return " vs ".join(str(s.get("n", 0)) for s in sides)


def _mech_claim(preset: str, arm: str, column: str, expected: str):
    def evidence(f: Facts):
        a, s = f.mech_stats(preset, arm, column), f.mech_stats(preset, "softmax", column)
        return (f"`{preset}` {column}: {arm} {_c(a)} vs softmax {_c(s)}", _n(a, s),
                verdict(separation(a, s), expected))
    return evidence


def _outliers(f: Facts):
    largest = max(f.probe_stats(g, "*", "max_inf_norm").get("max", 0) for g in ("tiny", "small", "small3k"))
    a, s = f.probe_stats("small3k", "vga", "max_inf_norm"), f.probe_stats("small3k", "softmax", "max_inf_norm")
    return (f"zoo inf-norm <= {number(largest)} (OPT {OPT_VANILLA_INF_NORM}); small3k vga {_c(a)} vs {_c(s)}",
            _n(a, s), "untested" if largest < OUTLIER_INF_NORM else verdict(separation(a, s)))


def _quant_claim(arm: str, scheme: str, expected: str = "lower"):
    def evidence(f: Facts):
        a, s = stats(f.per_checkpoint("tiny", arm, scheme)), stats(f.per_checkpoint("tiny", "softmax", scheme))
        small = separation(stats(f.per_checkpoint("small", arm, scheme)),
                           stats(f.per_checkpoint("small", "softmax", scheme)))
        return (f"tiny `{scheme}` {arm} {_c(a, '%', True)} vs {_c(s, '%', True)}; small: {small}",
                _n(a, s), verdict(separation(a, s), expected))
    return evidence


def _guo_sink(f: Facts):
    a, v = f.mech_stats("bb-guo-cpu", "softmax", "attn_s"), f.mech_stats("bb-guo-cpu", "softmax", "val_s_ratio")
    return (f"`bb-guo-cpu` softmax attn_s {_c(a)}, V ratio {_c(v)} (Guo ~1, ~0)", str(a.get("n", 0)),
            "untested")


def _sigmoid(f: Facts):
    smol = f.probe_stats("smollm2", "-", "sink_rate")
    a, s = f.probe_stats("tiny", "sigmoid", "sink_rate"), f.probe_stats("tiny", "softmax", "sink_rate")
    return (f"sink %: SmolLM2 {_c(smol)}; tiny sigmoid {_c(a)} vs softmax {_c(s)}", _n(a, s),
            verdict(separation(a, s)))


def _collapse(f: Facts):
    rel = f.rel_stats("smollm2", "-", PRIMARY_SCHEME)[0]
    massive = f.probe_stats("smollm2", "-", "massive")
    return (f"SmolLM2 (massive act. {number(massive.get('mean'), digits=5)}) `{PRIMARY_SCHEME}` {_c(rel, '%', True)}",
            f"{rel.get('n', 0)} draws", "supported" if rel.get("n") and rel["min"] > 50 else "contradicted")


def _clipped(f: Facts):
    fp = f.cells[(f.cells.group == "tiny") & (f.cells.scheme == "fp32")]
    a, s = stats(fp[fp.arm == "clipped"].ppl), stats(fp[fp.arm == "softmax"].ppl)
    return (f"tiny fp32 ppl: clipped {_c(a)} vs softmax {_c(s)}", _n(a, s),
            verdict(separation(a, s), "higher"))


def _retrofit(f: Facts):
    from qbench.study.retrofit import retrofit_claim

    return retrofit_claim(f.records)


CLAIMS = [
    Claim("VGA", "key-side VGA (Eq. 6) lowers attn. on BOS", "1", _mech_claim("bb", "vga", "attn_s", "lower")),
    Claim("VGA", "VGA stops the BOS value drain", "1", _mech_claim("bb", "vga", "val_s_ratio", "higher")),
    Claim("VGA", "output-side VGA (App. B) lowers attn. on BOS", "1b",
          _mech_claim("bb-guo-cpu", "vga_out", "attn_s", "lower")),
    Claim("VGA", "VGA has fewer activation outliers", "2", _outliers),
    Claim("VGA", "VGA loses less under W8A8", "2", _quant_claim("vga", PRIMARY_SCHEME)),
    Claim("VGA", "fine-tuned gates repair a pretrained model", "r", _retrofit),
    Claim("qbench", "VGA loses less under 4-bit weights", "2", _quant_claim("vga", "w4-rtn-g64")),
    Claim("Guo", "1-layer softmax BB: attn. on BOS -> 1, V_BOS -> 0", "1b", _guo_sink),
    Claim("Gu", "softmax LMs sink; sigmoid attention does not", "3", _sigmoid),
    Claim("Bondarenko", "per-tensor W8A8 collapses a model w/ outliers", "3", _collapse),
    Claim("Bondarenko", "gated attention (IGA) loses less under W8A8", "2", _quant_claim("iga", PRIMARY_SCHEME)),
    Claim("Bondarenko", "clipped softmax hurts a causal LM", "2", _clipped),
]


def claims_table(facts: Facts) -> pd.DataFrame:
    rows = []
    for claim in CLAIMS:
        try:
            evidence, n, decision = claim.evidence(facts)
        except MissingValue as err:
            evidence, n, decision = f"missing: {err.args[0]}", "0", "untested"
        rows.append({"source": claim.source, "claim": claim.text, "our evidence (± over seeds)": evidence, "seeds": n,
                     "verdict": decision, "§": f"[{claim.section}](#s{claim.section})"})
    return pd.DataFrame(rows)


HEADLINE_SCHEMES = [("W8A8-pt %", PRIMARY_SCHEME), ("W4 g64 %", "w4-rtn-g64")]


def _compact(s: dict, signed: bool = True) -> str:
    if not s.get("n"):
        return "-"
    text = number(s["mean"], signed)
    return text + (f"±{number(s['std'], False, 2)}" if s.get("std") is not None else "")


def headline_table(facts: Facts) -> pd.DataFrame:
    """One row per (group, arm): n seeds, fp32 ppl, the primary endpoint and W4, the fp32
    extreme-token indicators, and whether the arm separates from softmax (rule above)."""
    rows = []
    for group in ("tiny", "small", "small3k", "smollm2"):
        for arm in facts.arms(group):
            fp = facts.cells[(facts.cells.group == group) & (facts.cells.arm == arm) & (facts.cells.scheme == "fp32")]
            row = {"model · arm": f"{group} · {arm}" if arm != "-" else "SmolLM2-135M",
                   "n": fp.model.nunique(), "fp32 ppl": _compact(stats(fp.groupby("model").ppl.mean()), False)}
            for label, scheme in HEADLINE_SCHEMES:
                row[label] = _compact(facts.rel_stats(group, arm, scheme)[0])
            row["sink %"] = _compact(facts.probe_stats(group, arm, "sink_rate"), False)
            row["inf-norm"] = _compact(facts.probe_stats(group, arm, "max_inf_norm"), False)
            row["kurt. max"] = _compact(facts.probe_stats(group, arm, "kurtosis_max"), False)
            if group == "smollm2" or arm == "softmax":
                row["vs softmax (pt / W4)"] = "-"
            else:
                row["vs softmax (pt / W4)"] = " / ".join(
                    separation(stats(facts.per_checkpoint(group, arm, s)), stats(facts.per_checkpoint(group, "softmax", s)))
                    for _, s in HEADLINE_SCHEMES)
            rows.append(row)
    return pd.DataFrame(rows)
