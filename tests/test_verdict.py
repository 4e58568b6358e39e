"""The study's one verdict rule (qbench/study/verdict.py): exact permutation p-values checked
against hand counts, the interval against the test it inverts, and every claims-table row
of the committed STUDY.md recomputed from the records with the function."""
import math

import pytest

from qbench.study.verdict import (ALPHA, Evidence, false_positive, permutation_p, shift_interval, sign_flip_p,
                                  verdict)

LOW, HIGH = (1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)


def test_exact_permutation_p_values_by_hand():
    # fully separated 4 vs 4: only the observed split of C(8, 4) = 70 is as extreme
    assert permutation_p(LOW, HIGH, "lower") == pytest.approx(1 / 70)
    assert permutation_p(LOW, HIGH, "higher") == 1.0  # every relabelling is at least as high
    # arm {1,2,3,5} (sum 11): subsets of 1..8 of size 4 with sum <= 11 are {1,2,3,4}, {1,2,3,5}
    assert permutation_p((1, 2, 3, 5), (4, 6, 7, 8), "lower") == pytest.approx(2 / 70)
    # arm {1,2,3,6} (sum 12): + {1,2,3,6}, {1,2,4,5}: 4/70 = 0.057 > 0.05
    assert permutation_p((1, 2, 3, 6), (4, 5, 7, 8), "lower") == pytest.approx(4 / 70)
    # 3 vs 3 fully separated: 1 / C(6, 3)
    assert permutation_p((1, 2, 3), (4, 5, 6), "lower") == pytest.approx(1 / 20)
    # ties count as extreme: all equal -> p = 1
    assert permutation_p((1, 1, 1, 1), (1, 1, 1, 1), "lower") == 1.0
    # sign flips: 5 values all above the target -> only the identity flip is as high: 1/32
    assert sign_flip_p((1, 2, 3, 4, 5), 0.0, "higher") == pytest.approx(1 / 32)


def test_verdict_labels_follow_the_rule():
    assert verdict(Evidence(LOW, HIGH, "lower")).label == "supported"
    assert verdict(Evidence(HIGH, LOW, "lower")).label == "contradicted"
    assert verdict(Evidence((1, 2, 3, 6), (4, 5, 7, 8), "lower")).label == "not shown"  # p = 4/70
    assert verdict(Evidence((1, 2, 3, 5), (4, 6, 7, 8), "lower")).label == "supported"  # p = 2/70
    # fewer than 4 seeds: insufficient however separated, never a lead
    assert verdict(Evidence((1, 2, 3), (4, 5, 6), "lower")).label == "insufficient"
    assert verdict(Evidence((1, 2), (8, 9), "lower")).label == "insufficient"
    assert verdict(Evidence((), (1, 2, 3, 4), "lower")).label == "untested"
    # a difference inside the arithmetic sensitivity is not an effect
    assert verdict(Evidence(LOW, HIGH, "lower", sensitivity=4.0)).label == "not shown"
    assert verdict(Evidence(LOW, HIGH, "lower", sensitivity=3.9)).label == "supported"
    # one sample against a published value: 4 flips cannot reach 0.05 (1/16), 5 can (1/32)
    assert verdict(Evidence((0.3, 0.35, 0.4, 0.38), target=0.9, predicted="higher")).label == "not shown"
    assert verdict(Evidence((0.3, 0.35, 0.4, 0.38, 0.33), target=0.9, predicted="higher")).label == "contradicted"


def test_false_positive_chance_at_the_rules_sizes():
    assert false_positive(4, 4) == pytest.approx(3 / 70)
    assert false_positive(3, 3) == pytest.approx(1 / 20)
    assert false_positive(5, 5) == pytest.approx(12 / 252)
    assert all(false_positive(n, m) <= ALPHA for n in range(2, 8) for m in range(2, 8))


def test_the_interval_inverts_the_test():
    """At a shift just inside the interval's lower end the one-sided test of "difference > d"
    does not reject; just outside it does (and the same at the upper end)."""
    arm, ref = (1.03, 2.51, 3.07, 4.22, 2.29), (5.01, 6.13, 4.05, 8.11, 6.67)  # no tied crossings
    lo, hi = shift_interval(arm, ref)
    diff = sum(arm) / 5 - sum(ref) / 5
    assert lo < diff < hi
    eps = 1e-6
    for d, rejects in ((lo - eps, True), (lo + eps, False)):
        assert (permutation_p([a - d for a in arm], ref, "higher") <= ALPHA) is rejects
    for d, rejects in ((hi + eps, True), (hi - eps, False)):
        assert (permutation_p([a - d for a in arm], ref, "lower") <= ALPHA) is rejects
    # too few relabellings for the level: an unbounded side
    assert shift_interval((1.0, 2.0), (3.0, 4.0)) == (-math.inf, math.inf)


def _committed_claims_rows() -> list[list[str]]:
    """The data rows of the committed STUDY.md's claims table, cells split."""
    from qbench.paths import REPO_ROOT

    lines = (REPO_ROOT / "results" / "STUDY.md").read_text().splitlines()
    section = lines[lines.index("## The claims against our evidence"):lines.index("## Headline per arm")]
    table = [line for line in section if line.startswith("|")]
    assert "| verdict |" in table[0] and table[1].startswith("|---")
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table[2:]]


def test_every_claims_row_is_the_verdict_function_of_the_records():
    """Each claim's evidence function gives Evidence (not a verdict); the committed table's
    verdict cell is exactly what the one function computes from the committed records."""
    from qbench.paths import REPO_ROOT, models_dir
    from qbench.results import ResultStore
    from qbench.study.claims import CLAIMS, verdict_cell
    from qbench.study.facts import Facts

    facts = Facts(ResultStore(REPO_ROOT / "results").records(), models_dir())
    rows = _committed_claims_rows()
    assert len(rows) == len(CLAIMS)
    for claim, row in zip(CLAIMS, rows):
        text, evidence = claim.evidence(facts)
        assert evidence and all(isinstance(e, Evidence) for e in evidence), claim.text
        assert row[1] == claim.text
        assert row[4] == verdict_cell([verdict(e) for e in evidence]), (claim.text, row[4])


def test_a_primary_row_recomputed_independently_from_the_records():
    """The W8A8 row's evidence rebuilt here from raw records (whole split, mean over draws
    per checkpoint) gives the same verdict as the table."""
    import json

    from qbench.paths import REPO_ROOT
    from qbench.zoo import read_zoo

    zoo = read_zoo()
    per: dict = {}
    fp: dict = {}
    for path in (REPO_ROOT / "results" / "records").glob("*.json"):
        r = json.loads(path.read_text())
        entry = zoo.get(r["model"], {})
        if (r.get("task") != "ppl" or r.get("status") != "ok" or entry.get("preset") != "tiny"
                or r["protocol"] != "nonoverlap-w256-bos-sotu-test"):
            continue
        if r["scheme"] == "fp32":
            fp[r["model"]] = r["metrics"]["ppl"]
        elif r["scheme"] == "w8a8-pt":
            per.setdefault((entry["arm"], r["model"]), []).append(r["metrics"]["ppl"])
    values = {arm: tuple(100 * (sum(v) / len(v) / fp[m] - 1) for (a, m), v in per.items() if a == arm and m in fp)
              for arm in ("vga", "softmax")}
    row = next(r for r in _committed_claims_rows() if r[1] == "VGA loses less under W8A8")
    expected = verdict(Evidence(values["vga"], values["softmax"], "lower", "tiny")).label
    assert row[4].split(";")[0].split(": ")[-1] == expected
