"""The one verdict rule of the study.  Every row of STUDY.md's claims table hands its
evidence to `verdict()`; no row decides for itself.

The rule (RULE_TEXT says it in STUDY.md):

- a unit is a training seed (a checkpoint; its value is the mean over its calibration
  draws); a verdict needs at least MIN_UNITS units on each side, else *insufficient*;
- the test is an exact permutation test of the difference in means, one-sided in the
  direction the claim predicts, at level ALPHA: *supported* when p <= ALPHA; the mirror
  test (one-sided against the prediction, same level) gives *contradicted*; neither:
  *not shown*.  A difference no larger than the evidence's arithmetic sensitivity (how far
  the value moves when the same cell is recomputed with other kernels) is never read as
  an effect: *not shown*;
- the effect is the difference in means (arm - reference) with the 1 - 2 ALPHA interval
  obtained by inverting the same permutation test over shifts (the shifts d for which
  neither one-sided test of "arm - d vs reference" rejects at ALPHA);
- a one-sample claim (a published end state) uses the exact sign-flip test of the mean
  against the published value, with the same MIN_UNITS and ALPHA.

Under "no difference" (exchangeable units) each one-sided test rejects with probability at
most ALPHA, exactly floor(ALPHA * C) / C for C distinct relabellings (`false_positive`):
3/70 = 4.3% at 4 vs 4, so a verdict (supported or contradicted) arises by chance with
probability 6/70 = 8.6% per row.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

MIN_UNITS = 4
ALPHA = 0.05
MAX_RELABELLINGS = 2_000_000  # exact enumeration only; 10 vs 10 is 184,756
LABELS = ("supported", "contradicted", "not shown", "insufficient", "untested")
RULE_TEXT = (f"a verdict needs >= {MIN_UNITS} units (training seeds; each the mean over its calibration draws) on "
             f"each side, else *insufficient* (never a lead); the test is an exact permutation test of the "
             f"difference in means, one-sided in the direction the claim predicts, at level {ALPHA}: *supported* "
             f"if p <= {ALPHA}, *contradicted* if the mirror one-sided test (against the prediction) gives p <= "
             f"{ALPHA}, else *not shown*; a difference no larger than the cells' arithmetic sensitivity (the value "
             f"recomputed with other kernels) is *not shown*; *untested* = no record can test it. The effect is the "
             f"difference in means (arm - reference) with its {1 - 2 * ALPHA:.0%} interval from inverting the same "
             f"test over shifts; a claim against a published value uses the exact sign-flip test of the mean")


@dataclass(frozen=True)
class Evidence:
    """What a claim is judged on: per-unit values of the arm and of its reference (or a
    published `target` for a one-sample claim), the direction the claim predicts for the
    arm ("lower" or "higher" than the reference), the claim's scope (which models the
    units are), and the values' arithmetic sensitivity (same unit as the values)."""
    arm: tuple[float, ...]
    reference: tuple[float, ...] = ()
    predicted: str = "lower"
    scope: str = ""
    target: float | None = None
    sensitivity: float = 0.0

    def __post_init__(self):
        if self.predicted not in ("lower", "higher"):
            raise ValueError(f"predicted must be 'lower' or 'higher', got {self.predicted!r}")
        object.__setattr__(self, "arm", tuple(float(v) for v in self.arm if _finite(v)))
        object.__setattr__(self, "reference", tuple(float(v) for v in self.reference if _finite(v)))


@dataclass(frozen=True)
class Verdict:
    label: str
    n: tuple[int, int]  # units: arm, reference (0 for a published target)
    difference: float | None = None  # mean(arm) - mean(reference or target)
    interval: tuple[float, float] | None = None
    p_predicted: float | None = None  # one-sided p in the predicted direction
    p_against: float | None = None
    scope: str = ""

    def text(self) -> str:
        """`supported (p 0.014; diff -0.07 [-0.10, -0.03])`; `insufficient (diff -0.07)` where no
        test ran; the label alone without a difference."""
        if self.difference is None:
            return self.label
        if self.p_predicted is None:
            return f"{self.label} (diff {_g(self.difference)})"
        lo, hi = self.interval or (math.nan, math.nan)
        p = self.p_predicted if self.label != "contradicted" else self.p_against
        return f"{self.label} (p {p:.2g}; diff {_g(self.difference)} [{_g(lo)}, {_g(hi)}])"


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _g(v: float) -> str:
    return "-inf" if v == -math.inf else "inf" if v == math.inf else f"{v:+.3g}"


def _mean(values) -> float:
    return sum(values) / len(values)


def _relabellings(n: int, m: int) -> int:
    count = math.comb(n + m, n)
    if count > MAX_RELABELLINGS:
        raise ValueError(f"{n} vs {m} units have {count:,} relabellings; exact enumeration stops at "
                         f"{MAX_RELABELLINGS:,}")
    return count


def permutation_p(arm, reference, direction: str = "lower") -> float:
    """Exact one-sided p of "arm's mean is `direction` than reference's": the fraction of all
    C(n+m, n) relabellings whose difference in means is at least as far in that direction
    as the observed one (ties count, with a relative float tolerance)."""
    arm, reference = list(arm), list(reference)
    n, m = len(arm), len(reference)
    count = _relabellings(n, m)
    pooled, total = arm + reference, sum(arm) + sum(reference)
    sign = -1.0 if direction == "lower" else 1.0
    observed = sign * (_mean(arm) - _mean(reference))
    slack = 1e-12 * max(1.0, max(abs(v) for v in pooled))
    extreme = 0
    for chosen in itertools.combinations(range(n + m), n):
        s = sum(pooled[i] for i in chosen)
        if sign * (s / n - (total - s) / m) >= observed - slack:
            extreme += 1
    return extreme / count


def sign_flip_p(values, target: float, direction: str = "lower") -> float:
    """Exact one-sided p of "the mean of `values` is `direction` than `target`": the
    fraction of the 2^n sign flips of (value - target) whose mean is at least as far."""
    d = [v - target for v in values]
    sign = -1.0 if direction == "lower" else 1.0
    observed = sign * _mean(d)
    slack = 1e-12 * max(1.0, max(abs(v) for v in d))
    hits = sum(1 for signs in itertools.product((1.0, -1.0), repeat=len(d))
               if sign * _mean([s * v for s, v in zip(signs, d)]) >= observed - slack)
    return hits / 2 ** len(d)


def false_positive(n: int, m: int, alpha: float = ALPHA) -> float:
    """The chance that one one-sided test rejects when there is no difference (distinct
    values, exchangeable units): floor(alpha * C) / C, C = C(n+m, n)."""
    count = math.comb(n + m, n)
    return math.floor(alpha * count + 1e-9) / count


def shift_interval(arm, reference, alpha: float = ALPHA) -> tuple[float, float]:
    """The 1 - 2 alpha interval of mean(arm) - mean(reference) from inverting the one-sided
    permutation tests over shifts d (arm - d against reference).  For a relabelling that
    puts k < n arm units on the arm side, its statistic crosses the observed one at
    d* = (D - A) / ((n - k)(1/n + 1/m)); the one-sided p at shift d is (1 + #{d* <= d}) / C,
    so the lower end is the floor(alpha C)-th smallest d* (-inf if alpha C < 1)."""
    def lower(a, r):
        n, m = len(a), len(r)
        count = _relabellings(n, m)
        k_needed = math.floor(alpha * count + 1e-9)
        if k_needed < 1:
            return -math.inf
        pooled, total = list(a) + list(r), sum(a) + sum(r)
        observed = _mean(a) - _mean(r)
        crossings = []
        for chosen in itertools.combinations(range(n + m), n):
            k = sum(1 for i in chosen if i < n)
            if k == n:
                continue
            s = sum(pooled[i] for i in chosen)
            crossings.append((observed - (s / n - (total - s) / m)) / ((n - k) * (1 / n + 1 / m)))
        crossings.sort()
        return crossings[k_needed - 1]

    lo = lower(arm, reference)
    hi = -lower([-v for v in arm], [-v for v in reference])
    return lo, hi


def _sign_flip_interval(values, alpha: float = ALPHA) -> tuple[float, float]:
    """The 1 - 2 alpha interval of the mean by inverting the sign-flip test: the t for which
    neither one-sided test of mean(values) against t rejects (scanned at the values' midpoints
    of sign-flip crossings: the averages of subsets, Walsh-like)."""
    n = len(values)
    candidates = sorted({_mean(c) for k in range(1, n + 1) for c in itertools.combinations(values, k)})
    inside = [t for t in candidates if sign_flip_p(values, t, "lower") > alpha and sign_flip_p(values, t, "higher")
              > alpha]
    return (min(inside), max(inside)) if inside else (math.nan, math.nan)


def verdict(evidence: Evidence, min_units: int = MIN_UNITS, alpha: float = ALPHA) -> Verdict:
    """The study's one verdict rule (module docstring) applied to one claim's evidence."""
    e = evidence
    against = "higher" if e.predicted == "lower" else "lower"
    one_sample = e.target is not None
    n = (len(e.arm), 0 if one_sample else len(e.reference))
    if not e.arm or (not one_sample and not e.reference):
        return Verdict("untested", n, scope=e.scope)
    difference = _mean(e.arm) - (e.target if one_sample else _mean(e.reference))
    if min(n[0], n[1] if not one_sample else n[0]) < min_units:
        return Verdict("insufficient", n, difference, scope=e.scope)
    if one_sample:
        p_for, p_against = sign_flip_p(e.arm, e.target, e.predicted), sign_flip_p(e.arm, e.target, against)
        lo, hi = _sign_flip_interval(e.arm, alpha)
        interval = (lo - e.target, hi - e.target)
    else:
        p_for, p_against = permutation_p(e.arm, e.reference, e.predicted), permutation_p(e.arm, e.reference, against)
        interval = shift_interval(e.arm, e.reference, alpha)
    if abs(difference) <= e.sensitivity:
        label = "not shown"
    elif p_for <= alpha:
        label = "supported"
    elif p_against <= alpha:
        label = "contradicted"
    else:
        label = "not shown"
    return Verdict(label, n, difference, interval, p_for, p_against, e.scope)


def chance_sentence(n: int = MIN_UNITS, m: int = MIN_UNITS, alpha: float = ALPHA) -> str:
    """The false-positive chance of one verdict under the rule, at the smallest sizes it judges."""
    one = false_positive(n, m, alpha)
    count = math.comb(n + m, n)
    return (f"With no true difference, a *supported* verdict arises by chance with probability at most "
            f"{round(one * count)}/{count} = {one:.1%} at {n} vs {m} seeds (the smallest one-sided p is "
            f"1/{count}), and either verdict with {2 * one:.1%}; with more seeds it stays at most {alpha}. "
            f"Over k rows with a verdict, about k x {2 * one:.3f} are expected by chance alone.")
