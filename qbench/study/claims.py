"""The first screen of STUDY.md: the answer, the papers' claims against our evidence, then
one headline row per arm.  Every number comes from `Facts`; every verdict from the one rule
of qbench/study/verdict.py: a claim's evidence function returns the per-unit values it is
judged on (`Evidence`, one per scope), and `claims_table` hands each to `verdict()`; no
claim decides for itself (tests/test_verdict.py recomputes every row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from qbench.study.facts import Facts, MissingValue, number, stats
from qbench.study.published import OPT_VANILLA_INF_NORM
from qbench.study.verdict import Evidence, Verdict, verdict

# The primary endpoint, stated once and used by the headline table and the claims.
PRIMARY_SCHEME = "w8a8-pt"
PRIMARY_ENDPOINT = ("relative perplexity change (%) under `w8a8-pt` (Bondarenko's per-tensor static W8A8) against the "
                    "same checkpoint's fp32, on the whole SOTU test split; per checkpoint the "
                    "mean over its 3 calibration draws, then over training seeds. The first 20,000 characters of the "
                    "test split (sections 2-4) are the quick check")
SPREAD_DEFINITION = ("`a ± b (n)`: mean ± sample standard deviation over the n units named (training seeds, each "
                     "the mean over its calibration draws; for SmolLM2, calibration draws); `a to b`: smallest to "
                     "largest; a signed number is a change against fp32 (+ = worse)")
# Outliers "present": Bondarenko et al.'s vanilla OPT reaches max inf-norm 340; at most this
# much, a model has no outliers for an arm to remove (SmolLM2 has ~25,000).
OUTLIER_INF_NORM = 20.0


@dataclass
class Claim:
    source: str
    text: str
    section: str
    evidence: Callable[[Facts], tuple[str, list[Evidence]]]  # -> (evidence text, one Evidence per scope)


def _c(s: dict, unit: str = "", signed: bool = False) -> str:
    """Compact `mean±std`, or the value for n = 1 (n goes in its own column)."""
    if not s.get("n"):
        raise MissingValue("no records")
    text = number(s["mean"], signed)
    return text + (f"±{number(s['std'], False, 2)}" if s.get("std") is not None else "") + unit


def _values(series) -> tuple[float, ...]:
    return tuple(float(v) for v in series if v is not None and not pd.isna(v))


def _mech(f: Facts, preset: str, arm: str, column: str) -> tuple[float, ...]:
    frame = f.mechanism(preset)
    if frame.empty or column not in frame:
        return ()
    return _values(frame[frame.arm == arm][column])


def _probe(f: Facts, group: str, arm: str, metric: str) -> tuple[float, ...]:
    frame = f.probes[f.probes.group == group] if not f.probes.empty else f.probes
    return _values(frame[frame.arm == arm][metric]) if metric in frame else ()


def _mech_claim(preset: str, arm: str, column: str, predicted: str):
    def evidence(f: Facts):
        a, s = _mech(f, preset, arm, column), _mech(f, preset, "softmax", column)
        return (f"`{preset}` {column}: {arm} {_c(stats(a))} vs softmax {_c(stats(s))}",
                [Evidence(a, s, predicted, preset)])
    return evidence


def _value_drain(f: Facts):
    """VGA's claim is about the value the weighted sum reads: for key-side VGA that is the
    gated BOS value (`val_s_eff_ratio`), not the raw one (`val_s_ratio`)."""
    gated, raw = _mech(f, "bb", "vga", "val_s_eff_ratio"), _mech(f, "bb", "vga", "val_s_ratio")
    s = _mech(f, "bb", "softmax", "val_s_ratio")
    return (f"`bb` BOS value ratio read: vga gated {_c(stats(gated))} (raw {_c(stats(raw))}) vs softmax "
            f"{_c(stats(s))}", [Evidence(gated, s, "higher", "bb")])


def _vga_out(f: Facts):
    a, s = _mech(f, "bb", "vga_out", "attn_s"), _mech(f, "bb", "softmax", "attn_s")
    ga, gs = _mech(f, "bb-guo-cpu", "vga_out", "attn_s"), _mech(f, "bb-guo-cpu", "softmax", "attn_s")
    return (f"attn_s `bb`: vga_out {_c(stats(a))} vs softmax {_c(stats(s))}; `bb-guo-cpu`: {_c(stats(ga))} vs "
            f"{_c(stats(gs))}", [Evidence(a, s, "lower", "bb"), Evidence(ga, gs, "lower", "bb-guo-cpu")])


def _outliers(f: Facts):
    largest = max(f.probe_stats(g, "*", "max_inf_norm").get("max", 0) for g in ("tiny", "small", "small3k"))
    a, s = _probe(f, "tiny", "vga", "kurtosis_max"), _probe(f, "tiny", "softmax", "kurtosis_max")
    na, ns = _probe(f, "tiny", "vga", "max_inf_norm"), _probe(f, "tiny", "softmax", "max_inf_norm")
    return (f"tiny kurt. max vga {_c(stats(a))} vs {_c(stats(s))}, inf-norm {_c(stats(na))} vs {_c(stats(ns))} "
            f"(zoo <= {number(largest)}, OPT {OPT_VANILLA_INF_NORM})",
            [Evidence(a, s, "lower", "tiny kurtosis"), Evidence(na, ns, "lower", "tiny inf-norm")])


def _quant_claim(arm: str, scheme: str, predicted: str = "lower"):
    """The primary endpoint (whole test split, every draw), with the quick check and the
    small preset (one draw, short protocol) beside it."""
    def evidence(f: Facts):
        a, s = _values(f.primary("tiny", arm, scheme)), _values(f.primary("tiny", "softmax", scheme))
        qa, qs = _values(f.per_checkpoint("tiny", arm, scheme)), _values(f.per_checkpoint("tiny", "softmax", scheme))
        sa, ss = _values(f.per_checkpoint("small", arm, scheme)), _values(f.per_checkpoint("small", "softmax", scheme))
        draws = f.draws_of("tiny", arm, scheme)
        text = (f"tiny `{scheme}` {arm} {_c(stats(a), '%', True)} vs {_c(stats(s), '%', True)} ({draws} "
                f"draw{'' if draws == '1' else 's'}); 20k {_c(stats(qa), '%', True)} vs {_c(stats(qs), '%', True)}")
        scopes = [Evidence(a, s, predicted, "tiny", sensitivity=f.sensitivity("tiny", [arm, "softmax"], scheme))]
        if sa and ss:
            text += f"; small {_c(stats(sa), '%', True)} vs {_c(stats(ss), '%', True)}"
            scopes.append(Evidence(sa, ss, predicted, "small"))
        return text, scopes
    return evidence


def _guo_sink(f: Facts):
    """Guo et al.'s 1-layer end state (attention on BOS -> ~1): a one-sample claim against
    the published value; predicted: not lower than it."""
    a, v = _mech(f, "bb-guo-cpu", "softmax", "attn_s"), _mech(f, "bb-guo-cpu", "softmax", "val_s_ratio")
    return (f"`bb-guo-cpu` softmax attn_s {_c(stats(a))}, V ratio {_c(stats(v))} (Guo: ~1, ~0)",
            [Evidence(a, predicted="higher", scope="bb-guo-cpu vs published 1", target=0.9)])


def _sigmoid(f: Facts):
    smol = f.probe_stats("smollm2", "-", "sink_rate")
    a, s = _probe(f, "tiny", "sigmoid", "sink_rate"), _probe(f, "tiny", "softmax", "sink_rate")
    return (f"sink %: SmolLM2 {_c(smol)}; tiny sigmoid {_c(stats(a))} vs softmax {_c(stats(s))}",
            [Evidence(a, s, "lower", "tiny")])


def _collapse(f: Facts):
    """One model with outliers and no comparator model without them: its units are models
    (one), not calibration draws."""
    rel = f.rel_stats("smollm2", "-", PRIMARY_SCHEME)[0]
    massive = f.probe_stats("smollm2", "-", "massive")
    if not rel.get("n"):
        raise MissingValue("no SmolLM2 records")
    from qbench.recheck import mixed_cells

    kinds = next((k for (m, sc, task, p), k in mixed_cells(f.records).items()
                  if m == "smollm2-135m" and sc == PRIMARY_SCHEME and p.endswith("-first20000c")), None)
    mixed = f" on {len({c for c, _ in kinds})} CPU kinds" if kinds else ""
    return (f"SmolLM2 (massive act. {number(massive.get('mean'), digits=5)}) `{PRIMARY_SCHEME}` "
            f"{_c(rel, '%', True)} over {rel['n']} draws{mixed}; one model, no comparator",
            [Evidence((rel["mean"],), predicted="higher", scope="SmolLM2 vs a 50% loss", target=50.0)])


def _clipped(f: Facts):
    scopes, parts = [], []
    for group in ("tiny", "small"):
        fp = f.cells[(f.cells.group == group) & (f.cells.scheme == "fp32")]
        a = _values(fp[fp.arm == "clipped"].groupby("model").ppl.mean())
        s = _values(fp[fp.arm == "softmax"].groupby("model").ppl.mean())
        if a or s:
            parts.append(f"{group} fp32 ppl clipped {_c(stats(a))} vs softmax {_c(stats(s))}")
            scopes.append(Evidence(a, s, "higher", group))
    return "; ".join(parts), scopes


def _retrofit(f: Facts):
    from qbench.study.retrofit import retrofit_claim

    return retrofit_claim(f.records)


CLAIMS = [
    Claim("VGA", "key-side VGA (Eq. 6) lowers attn. on BOS", "1", _mech_claim("bb", "vga", "attn_s", "lower")),
    Claim("VGA", "VGA stops the BOS value drain", "1", _value_drain),
    Claim("VGA", "output-side VGA (App. B) lowers attn. on BOS", "1", _vga_out),
    Claim("VGA", "VGA has fewer activation outliers", "2", _outliers),
    Claim("VGA", "VGA loses less under W8A8", "5", _quant_claim("vga", PRIMARY_SCHEME)),
    Claim("VGA", "fine-tuned gates repair a pretrained model", "r", _retrofit),
    Claim("qbench", "VGA loses less under 4-bit weights", "5", _quant_claim("vga", "w4-rtn-g64")),
    Claim("Guo", "1-layer softmax BB: attn. on BOS -> 1, V_BOS -> 0", "1b", _guo_sink),
    Claim("Gu", "softmax LMs sink; sigmoid attention does not", "3", _sigmoid),
    Claim("Bondarenko", "per-tensor W8A8 collapses a model w/ outliers", "3", _collapse),
    Claim("Bondarenko", "gated attention (IGA) loses less under W8A8", "5", _quant_claim("iga", PRIMARY_SCHEME)),
    Claim("Bondarenko", "clipped softmax hurts a causal LM", "2", _clipped),
]


def judged(claim: Claim, facts: Facts) -> tuple[str, list[Verdict]]:
    """A claim's evidence text and the verdict of each of its scopes, by the one rule."""
    text, evidence = claim.evidence(facts)
    return text, [verdict(e) for e in evidence]


def verdict_cell(verdicts: list[Verdict]) -> str:
    if len(verdicts) == 1:
        return verdicts[0].label
    return "; ".join(f"{v.scope}: {v.label}" for v in verdicts)


def _units(v: Verdict) -> str:
    return f"{v.n[0]}" if v.n[1] == 0 else f"{v.n[0]} vs {v.n[1]}"


def _effect(v: Verdict) -> str:
    if v.difference is None:
        return "-"
    if v.interval is None:
        return number(v.difference, True)
    lo, hi = v.interval
    return f"{number(v.difference, True)} [{number(lo, True)}, {number(hi, True)}] p={number(v.p_predicted, digits=2)}"


def claims_table(facts: Facts) -> pd.DataFrame:
    rows = []
    for claim in CLAIMS:
        try:
            evidence, verdicts = judged(claim, facts)
        except MissingValue as err:
            evidence, verdicts = f"missing: {err.args[0]}", [verdict(Evidence(()))]
        rows.append({"source": claim.source, "claim": claim.text, "our evidence (± over seeds)": evidence,
                     "units": "; ".join(_units(v) for v in verdicts), "verdict": verdict_cell(verdicts),
                     "effect [90% CI] p": "; ".join(_effect(v) for v in verdicts),
                     "§": f"[{claim.section}](#s{claim.section})"})
    return pd.DataFrame(rows)


HEADLINE_SCHEMES = [("W8A8-pt %", PRIMARY_SCHEME, True), ("20k", PRIMARY_SCHEME, False),
                    ("W4 g64 %", "w4-rtn-g64", True)]


def _compact(s: dict, signed: bool = True) -> str:
    if not s.get("n"):
        return "-"
    text = number(s["mean"], signed)
    return text + (f"±{number(s['std'], False, 2)}" if s.get("std") is not None else "")


def versus_softmax(facts: Facts, group: str, arm: str, scheme: str) -> Verdict:
    """The headline's `vs softmax`: the one rule on the primary endpoint's protocol (whole split)."""
    a, s = _values(facts.primary(group, arm, scheme)), _values(facts.primary(group, "softmax", scheme))
    return verdict(Evidence(a, s, "lower", group, sensitivity=facts.sensitivity(group, [arm, "softmax"], scheme)))


def headline_table(facts: Facts) -> pd.DataFrame:
    """One row per (group, arm): n seeds, fp32 ppl, the primary endpoint (whole split), its
    quick check (20,000 characters) and W4 on the whole split, the fp32 extreme-token
    indicators, and the verdict against softmax (the one rule) under W8A8-pt and W4."""
    rows = []
    for group in ("tiny", "small", "small3k", "smollm2"):
        for arm in facts.arms(group):
            fp = facts.cells[(facts.cells.group == group) & (facts.cells.arm == arm) & (facts.cells.scheme == "fp32")]
            row = {"model · arm": f"{group} · {arm}" if arm != "-" else "SmolLM2-135M",
                   "n": fp.model.nunique(), "fp32 ppl": _compact(stats(fp.groupby("model").ppl.mean()), False)}
            for label, scheme, long in HEADLINE_SCHEMES:
                row[label] = (_compact(stats(facts.primary(group, arm, scheme))) if long
                              else _compact(facts.rel_stats(group, arm, scheme)[0]))
            row["sink %"] = _compact(facts.probe_stats(group, arm, "sink_rate"), False)
            row["inf-norm"] = _compact(facts.probe_stats(group, arm, "max_inf_norm"), False)
            row["kurt. max"] = _compact(facts.probe_stats(group, arm, "kurtosis_max"), False)
            if group == "smollm2" or arm == "softmax":
                row["vs softmax (pt / W4)"] = "-"
            else:
                row["vs softmax (pt / W4)"] = " / ".join(
                    versus_softmax(facts, group, arm, scheme).label for _, scheme, long in HEADLINE_SCHEMES if long)
            rows.append(row)
    return pd.DataFrame(rows)
