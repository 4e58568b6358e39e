"""The answer under STUDY.md's title, in three sentences filled from the records: the
primary endpoint's verdict, the 4-bit and outlier evidence, and the mechanism.  Every
verdict comes from the claims table's rows (the one rule, qbench/study/verdict.py); every
number from `Facts`."""
from __future__ import annotations

from qbench.study.claims import CLAIMS, PRIMARY_SCHEME, judged
from qbench.study.facts import Facts, MissingValue, number
from qbench.study.verdict import MIN_UNITS, Verdict

MEANING = {"supported": "VGA loses less than softmax at the test's level",
           "contradicted": "VGA loses more than softmax at the test's level",
           "not shown": "the test does not separate VGA from softmax",
           "insufficient": f"too few seeds for a verdict (the rule needs {MIN_UNITS} per arm)",
           "untested": "no record can test it yet"}


def _row(facts: Facts, text: str) -> tuple[str, list[Verdict]]:
    claim = next(c for c in CLAIMS if c.text == text)
    return judged(claim, facts)


def _units(v: Verdict) -> str:
    return f"{v.n[0]} vs {v.n[1]} seeds"


def answer(facts: Facts) -> str:
    """Three sentences; a part the records cannot give says so instead of failing."""
    try:
        _, (w8, *_) = _row(facts, "VGA loses less under W8A8")
        vga, soft = facts.value(f"prel:tiny:vga:{PRIMARY_SCHEME}"), facts.value(f"prel:tiny:softmax:{PRIMARY_SCHEME}")
        head = {"supported": "Yes at CPU scale, by a small margin", "contradicted": "No: at CPU scale it loses more",
                "not shown": "Not shown at CPU scale", "insufficient": "Not decided yet",
                "untested": "Not measured yet"}[w8.label]
        first = (f"**Does VGA make a model more quantizable? {head}.** On the primary endpoint (`{PRIMARY_SCHEME}`, "
                 f"whole test split) tiny VGA loses {vga} against softmax's {soft}: *{w8.label}* "
                 f"({_units(w8)}; {MEANING[w8.label]}).")
    except MissingValue as err:
        first = f"**Does VGA make a model more quantizable?** The primary endpoint is not computed yet ({err})."
    try:
        _, (w4, *_) = _row(facts, "VGA loses less under 4-bit weights")
        _, outliers = _row(facts, "VGA has fewer activation outliers")
        largest = max(facts.probe_stats(g, "*", "max_inf_norm").get("max", 0) for g in ("tiny", "small", "small3k"))
        second = (f"Under 4-bit weights the verdict is *{w4.label}* ({_units(w4)}), and the outlier premise is "
                  f"absent: no zoo checkpoint exceeds a max inf-norm of {number(largest)} (SmolLM2: "
                  f"{facts.value('probespan:smollm2:-:massive:5')}), while VGA's outlier indicators are "
                  f"*{outliers[0].label}* against softmax's.")
    except MissingValue as err:
        second = f"The 4-bit and outlier evidence is incomplete ({err})."
    try:
        _, (attn, *_) = _row(facts, "key-side VGA (Eq. 6) lowers attn. on BOS")
        _, (drain, *_) = _row(facts, "VGA stops the BOS value drain")
        against = attn.difference > 0 and drain.difference < 0
        third = (f"Mechanistically, on Bigram-Backcopy key-side VGA attends to BOS "
                 f"{facts.value('mech:bb:vga:attn_s')} against softmax's {facts.value('mech:bb:softmax:attn_s')} "
                 f"with a gated BOS value of {facts.value('mech:bb:vga:val_s_eff_ratio')} of the others' "
                 f"(softmax {facts.value('mech:bb:softmax:val_s_ratio')}): "
                 + ("both point against the paper (the sink stays and the gate closes at BOS)" if against
                    else "not both in the paper's direction" if not (attn.difference < 0 and drain.difference > 0)
                    else "both in the paper's direction")
                 + f", *{attn.label}* / *{drain.label}* under the rule ({_units(attn)}).")
    except MissingValue as err:
        third = f"The mechanism runs are incomplete ({err})."
    return " ".join([first, second, third])
