"""Named values from the records: what the claims table, the headline table and the prose
templates (study/DISCUSSION.md, study/README_RESULTS.md) quote.  A template names a value
as `{kind:arg:...}` (`{rel:tiny:vga:w8a8-pt}`); `Facts.value` computes it from the store, so a
recomputed record changes the sentence.  A stated constant that is not a measurement (a
recipe's step count, a paper's number) is written `{!1,000}` and printed as it stands.

Spreads: `a ± b` is the mean and the sample standard deviation (n - 1) over the n units
named beside it: training seeds (each seed's value is itself the mean over its calibration
draws) or, for one checkpoint, calibration draws.  `a to b` is the smallest and the largest.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from qbench.report import REFERENCE_SCHEME
from qbench.zoo import read_zoo

SHORT_LIMIT = 20000
GROUPS = ("tiny", "small", "small3k", "smollm2")
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


class MissingValue(KeyError):
    """A template names a value the records cannot give."""


def group_of(model: str, entry: dict) -> str | None:
    if model == "smollm2-135m":
        return "smollm2"
    preset = entry.get("preset")
    if preset == "small":
        return "small3k" if model.endswith("-3k") else "small"
    return preset if preset == "tiny" else None


def stats(values) -> dict:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"n": len(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def number(value: float, signed: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
        return ("+" + text) if signed and value > 0 else text
    text = f"{value:+.{digits}g}" if signed else f"{value:.{digits}g}"
    return text.replace("e-0", "e-")


def spread(s: dict, unit: str = "", signed: bool = False, what: str = "seeds", digits: int = 3) -> str:
    """`+0.16 ± 0.14% (2 seeds)`; one unit: `+0.16% (1 seed)`."""
    if not s.get("n"):
        raise MissingValue("no records")
    head = number(s["mean"], signed, digits)
    if s["std"] is not None:
        head += f" ± {number(s['std'], False, 2)}"
    noun = what if s["n"] != 1 else what.rstrip("s")
    return f"{head}{unit} ({s['n']} {noun})"


def span(s: dict, unit: str = "", signed: bool = False, digits: int = 3) -> str:
    if not s.get("n"):
        raise MissingValue("no records")
    if s["n"] == 1 or number(s["min"], signed, digits) == number(s["max"], signed, digits):
        return f"{number(s['min'], signed, digits)}{unit}"
    return f"{number(s['min'], signed, digits)}{unit} to {number(s['max'], signed, digits)}{unit}"


def _sum_or_nan(cell, reference, fp_ppl) -> float:
    """100 (|cell's move| + |its fp32's move|) / fp32 ppl: how far `rel` moves by arithmetic."""
    if cell is None or reference is None or pd.isna(cell) or pd.isna(reference) or not fp_ppl:
        return float("nan")
    return 100.0 * (cell + reference) / fp_ppl


def sensitivity_of(record: dict, metric: str) -> float | None:
    """|metric recomputed under perturbed arithmetic - metric| of a record, in the metric's
    units (None if not measured); see qbench/sensitivity.py."""
    found = ((record.get("sensitivity") or {}).get("metrics") or {}).get(metric)
    value = (record.get("metrics") or {}).get(metric)
    if not isinstance(found, (int, float)) or not isinstance(value, (int, float)):
        return None
    return abs(found - value)


@dataclass
class Facts:
    records: list[dict]
    models_dir: Path | None = None
    zoo: dict = field(default_factory=read_zoo)

    def __post_init__(self):
        self.cells = self._cells()
        self.long = self._cells(short=False)
        self.probes = self._probes()
        self._mechanism: dict[str, pd.DataFrame] = {}

    # -- data ----------------------------------------------------------------------
    def _cells(self, short: bool = True) -> pd.DataFrame:
        """One row per ppl record on the short protocol (`short=False`: on the whole test split,
        the primary endpoint's): its relative change against the fp32 record of the same model
        and protocol, and the record's arithmetic sensitivity (qbench/sensitivity.py) if
        measured, in perplexity units."""
        rows = []
        for r in self.records:
            protocol = str(r.get("protocol"))
            on_protocol = (protocol.endswith(f"-first{SHORT_LIMIT}c") if short
                           else protocol.startswith("nonoverlap") and "-first" not in protocol)
            if r.get("task") != "ppl" or r.get("status") != "ok" or not on_protocol:
                continue
            group = group_of(r["model"], self.zoo.get(r["model"], {}))
            if group is None:
                continue
            m = r.get("metrics") or {}
            rows.append({"group": group, "arm": self.arm(r["model"]), "model": r["model"], "scheme": r["scheme"],
                         "protocol": r["protocol"], "draw": r.get("calibration_seed"), "ppl": m.get("ppl"),
                         "kl": m.get("kl"), "ppl_sensitivity": sensitivity_of(r, "ppl")})
        frame = pd.DataFrame(rows, columns=["group", "arm", "model", "scheme", "protocol", "draw", "ppl", "kl",
                                            "ppl_sensitivity"])
        fp = frame[frame.scheme == REFERENCE_SCHEME].groupby(["model", "protocol"]).ppl.mean()
        frame["fp_ppl"] = [fp.get((m, p)) for m, p in zip(frame.model, frame.protocol)]
        frame["rel"] = 100.0 * (frame.ppl - frame.fp_ppl) / frame.fp_ppl
        # how far `rel` can move by arithmetic alone: the cell's ppl and its fp32's, each moved by its sensitivity
        fp_sens = frame[frame.scheme == REFERENCE_SCHEME].groupby(["model", "protocol"]).ppl_sensitivity.max()
        frame["rel_sensitivity"] = [_sum_or_nan(s, fp_sens.get((m, p)), f)
                                    for s, m, p, f in zip(frame.ppl_sensitivity, frame.model, frame.protocol,
                                                          frame.fp_ppl)]
        return frame

    def _probes(self) -> pd.DataFrame:
        rows = []
        for r in self.records:
            if r.get("task") != "probes" or r.get("scheme") != REFERENCE_SCHEME or r.get("status") != "ok":
                continue
            group = group_of(r["model"], self.zoo.get(r["model"], {}))
            if group is None:
                continue
            m = r.get("metrics") or {}
            values = m.get("value_norm_ratio_per_layer") or []
            gates = m.get("gate_at_sink_token") or []
            rows.append({"group": group, "arm": self.arm(r["model"]), "model": r["model"],
                         "sink_rate": m.get("sink_rate@0.3"), "first_token_share": m.get("first_token_share_mean"),
                         "max_inf_norm": m.get("max_inf_norm"), "kurtosis_max": m.get("kurtosis_max"),
                         "kurtosis_mean": m.get("kurtosis_mean"), "massive": m.get("massive_activation_max"),
                         "value_ratio_min": min(values) if values else None,
                         "gate_token0": sum(gates) / len(gates) if gates else None})
        return pd.DataFrame(rows).drop_duplicates("model", keep="last") if rows else pd.DataFrame(
            columns=["group", "arm", "model"])

    def mechanism(self, preset: str) -> pd.DataFrame:
        """The last row of each `preset` checkpoint's mechanism log, with its arm."""
        if preset not in self._mechanism:
            from qbench.study.mechanism import mechanism_logs

            rows = []
            for arm, runs in mechanism_logs(self.models_dir, preset).items() if self.models_dir else []:
                for name, log in runs:
                    rows.append({"arm": arm, "model": name, **log.iloc[-1].to_dict()})
            self._mechanism[preset] = pd.DataFrame(rows)
        return self._mechanism[preset]

    def arm(self, model: str) -> str:
        return self.zoo.get(model, {}).get("arm", model) if model != "smollm2-135m" else "-"

    def arms(self, group: str) -> list[str]:
        from qbench.modeling.attention import ATTENTION_ARMS

        present = set(self.cells[self.cells.group == group].arm)
        return [a for a in ATTENTION_ARMS if a in present] + sorted(present - set(ATTENTION_ARMS))

    # -- statistics ------------------------------------------------------------------
    def per_checkpoint(self, group: str, arm: str | None, scheme: str) -> pd.Series:
        """Each checkpoint's relative change (%), the mean over its calibration draws."""
        cells = self.cells[(self.cells.group == group) & (self.cells.scheme == scheme)]
        if arm not in (None, "*"):
            cells = cells[cells.arm == arm]
        return cells.groupby("model").rel.mean()

    def primary(self, group: str, arm: str, scheme: str) -> pd.Series:
        """Each checkpoint's relative change (%) on the whole test split (the primary
        endpoint), the mean over its calibration draws."""
        cells = self.long[(self.long.group == group) & (self.long.scheme == scheme) & (self.long.arm == arm)]
        return cells.groupby("model").rel.mean()

    def sensitivity(self, group: str, arms: list[str], scheme: str, long: bool = True) -> float:
        """The largest arithmetic sensitivity of `rel` (percentage points) over the cells of
        these arms (0 where none is measured: the verdict then rests on the test alone)."""
        frame = self.long if long else self.cells
        cells = frame[(frame.group == group) & (frame.scheme == scheme) & frame.arm.isin(arms)]
        value = cells.rel_sensitivity.max() if not cells.empty else float("nan")
        return 0.0 if pd.isna(value) else float(value)

    def draws_of(self, group: str, arm: str, scheme: str, long: bool = True) -> str:
        """`a-b` calibration draws per checkpoint (the fewest and most)."""
        frame = self.long if long else self.cells
        cells = frame[(frame.group == group) & (frame.scheme == scheme) & (frame.arm == arm)]
        counts = cells.groupby("model").size()  # an uncalibrated scheme: one cell, draw None
        if counts.empty:
            return "0"
        return str(counts.min()) if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"

    def rel_stats(self, group: str, arm: str, scheme: str) -> tuple[dict, str]:
        if group == "smollm2":  # one checkpoint: the spread is over calibration draws
            cells = self.cells[(self.cells.group == group) & (self.cells.scheme == scheme)]
            return stats(cells.rel), "draws"
        return stats(self.per_checkpoint(group, arm, scheme)), "seeds"

    def arm_means(self, group: str, scheme: str, arms: list[str] | None = None) -> dict[str, float]:
        per = self.cells[(self.cells.group == group) & (self.cells.scheme == scheme)]
        per = per.groupby(["arm", "model"]).rel.mean().groupby("arm").mean()
        return {a: v for a, v in per.items() if arms is None or a in arms}

    def probe_stats(self, group: str, arm: str, metric: str) -> dict:
        frame = self.probes[self.probes.group == group] if not self.probes.empty else self.probes
        if arm not in (None, "*"):
            frame = frame[frame.arm == arm]
        return stats(frame[metric]) if metric in frame else {"n": 0}

    def mech_stats(self, preset: str, arm: str, column: str) -> dict:
        frame = self.mechanism(preset)
        if frame.empty or column not in frame:
            return {"n": 0}
        return stats(frame[frame.arm == arm][column] if arm != "*" else frame[column])

    # -- the template language ---------------------------------------------------------
    def value(self, name: str) -> str:
        """The text of one named value (see the module docstring); MissingValue if the records
        cannot give it."""
        if name.startswith("!"):
            return name[1:]
        kind, *args = name.split(":")
        handler = getattr(self, f"_v_{kind}", None)
        if handler is None:
            raise MissingValue(f"unknown value kind {kind!r} in {{{name}}}")
        try:
            return handler(*args)
        except MissingValue as err:
            raise MissingValue(f"{{{name}}}: {err.args[0]}") from None

    def render(self, template: str) -> str:
        return PLACEHOLDER.sub(lambda m: self.value(m.group(1)), template)

    def _arms_filter(self, group: str, selector: str | None) -> list[str]:
        arms = self.arms(group)
        if not selector:
            return arms
        if selector.startswith("-"):
            return [a for a in arms if a not in selector[1:].split(",")]
        return [a for a in arms if a in selector.split(",")]

    def _v_rel(self, group, arm, scheme):
        """{rel:GROUP:ARM:SCHEME}: relative perplexity change, mean ± std (n seeds or draws)."""
        s, what = self.rel_stats(group, arm, scheme)
        return spread(s, "%", signed=True, what=what)

    def _v_relmean(self, group, arm, scheme):
        s, _ = self.rel_stats(group, arm, scheme)
        return span({**s, "min": s.get("mean"), "max": s.get("mean")}, "%", signed=True)

    def _v_relrange(self, group, scheme, selector=None):
        """{relrange:GROUP:SCHEME[:ARMS or -ARMS]}: smallest to largest arm mean."""
        means = self.arm_means(group, scheme, self._arms_filter(group, selector))
        return span(stats(means.values()), "%", signed=True)

    def _v_relspan(self, group, arm, scheme):
        """{relspan:GROUP:ARM:SCHEME}: smallest to largest single checkpoint (or draw, SmolLM2)."""
        if group == "smollm2":
            return span(stats(self.cells[(self.cells.group == group) & (self.cells.scheme == scheme)].rel), "%", True)
        return span(stats(self.per_checkpoint(group, arm, scheme)), "%", signed=True)

    def _v_argmax(self, group, scheme, selector=None):
        means = self.arm_means(group, scheme, self._arms_filter(group, selector))
        if not means:
            raise MissingValue("no records")
        return max(means, key=means.get)

    def _v_fp(self, group, arm):
        """{fp:GROUP:ARM}: fp32 perplexity, mean ± std over seeds."""
        cells = self.cells[(self.cells.group == group) & (self.cells.scheme == REFERENCE_SCHEME)]
        if arm != "*":
            cells = cells[cells.arm == arm]
        return spread(stats(cells.groupby("model").ppl.mean()), what="seeds", digits=4) if arm != "*" else span(
            stats(cells.groupby("model").ppl.mean()), digits=4)

    def _v_probe(self, group, arm, metric, digits="3"):
        """{probe:GROUP:ARM:METRIC}: an fp32 probe metric, mean ± std over seeds."""
        s = self.probe_stats(group, arm, metric)
        return spread(s, "%" if metric == "sink_rate" else "", digits=int(digits)) if arm != "*" else span(
            s, "%" if metric == "sink_rate" else "", digits=int(digits))

    def _v_probespan(self, group, arm, metric, digits="2"):
        s = self.probe_stats(group, arm, metric)
        return span(s, "%" if metric == "sink_rate" else "", digits=int(digits))

    def _v_mech(self, preset, arm, column, digits="2"):
        """{mech:PRESET:ARM:COLUMN}: a mechanism-log final value, mean ± std over seeds."""
        return spread(self.mech_stats(preset, arm, column), digits=int(digits))

    def _v_mechspan(self, preset, arm, column, digits="2"):
        return span(self.mech_stats(preset, arm, column), digits=int(digits))

    def _v_count(self, what, group=None, arm=None):
        """{count:arms:GROUP}, {count:seeds:GROUP:ARM}, {count:checkpoints:GROUP}, {count:draws:GROUP:SCHEME}."""
        cells = self.cells[self.cells.group == group] if group else self.cells
        if what == "arms":
            return str(len(self.arms(group)))
        if what == "seeds":
            if group not in GROUPS:  # a Bigram-Backcopy preset: its checkpoints' mechanism logs
                frame = self.mechanism(group)
                return str(int((frame.arm == arm).sum())) if not frame.empty else "0"
            return str(cells[cells.arm == arm].model.nunique())
        if what == "checkpoints":
            return str(cells.model.nunique())
        if what == "draws":
            return str(cells[cells.scheme == arm].draw.nunique())
        if what == "records":
            return f"{len(self.records):,}"
        raise MissingValue(f"unknown count {what!r}")

    def _model_cells(self, model, scheme):
        cells = self.cells[(self.cells.model == model) & (self.cells.scheme == scheme)]
        if cells.empty:
            raise MissingValue(f"no {model} {scheme} record")
        return cells

    def _v_ppl(self, model, scheme, digits="4"):
        """{ppl:MODEL:SCHEME}: one checkpoint's perplexity, mean over its calibration draws."""
        return number(self._model_cells(model, scheme).ppl.mean(), digits=int(digits))

    def _v_mrel(self, model, scheme):
        """{mrel:MODEL:SCHEME}: one checkpoint's relative change, ± over its calibration draws."""
        return spread(stats(self._model_cells(model, scheme).rel), "%", signed=True, what="draws")

    def _v_sep(self, group, arm, scheme, reference="softmax"):
        """{sep:GROUP:ARM:SCHEME}: the study's verdict (qbench/study/verdict.py) on "the arm
        loses less than softmax" from the per-seed values on the short protocol."""
        from qbench.study.verdict import Evidence, verdict

        return verdict(Evidence(tuple(self.per_checkpoint(group, arm, scheme)),
                                tuple(self.per_checkpoint(group, reference, scheme)), "lower", group)).label

    def _v_psep(self, group, arm, scheme, reference="softmax"):
        """{psep:GROUP:ARM:SCHEME}: the same verdict on the primary endpoint's protocol (whole split)."""
        from qbench.study.verdict import Evidence, verdict

        return verdict(Evidence(tuple(self.primary(group, arm, scheme)), tuple(self.primary(group, reference, scheme)),
                                "lower", group, sensitivity=self.sensitivity(group, [arm, reference], scheme))).label

    def _v_prel(self, group, arm, scheme):
        """{prel:GROUP:ARM:SCHEME}: relative change on the whole test split, mean ± std (n seeds)."""
        return spread(stats(self.primary(group, arm, scheme)), "%", signed=True)

    def _v_prelspan(self, group, arm, scheme):
        """{prelspan:GROUP:ARM:SCHEME}: smallest to largest checkpoint on the whole test split."""
        return span(stats(self.primary(group, arm, scheme)), "%", signed=True)

    def _v_klrange(self, group, scheme, selector=None):
        """{klrange:GROUP:SCHEME[:ARMS or -ARMS]}: smallest to largest single checkpoint's
        KL(P_fp || P_q) x 1000 on the short protocol, over the selected arms."""
        cells = self.cells[(self.cells.group == group) & (self.cells.scheme == scheme)
                           & self.cells.arm.isin(self._arms_filter(group, selector))]
        return span(stats(1000.0 * cells.groupby("model").kl.mean()), digits=3)

    def _v_relmax(self, group, scheme):
        """{relmax:GROUP:SCHEME}: the largest single checkpoint's change (short protocol) and its name."""
        per = self.cells[(self.cells.group == group) & (self.cells.scheme == scheme)].groupby("model").rel.mean()
        if per.empty:
            raise MissingValue("no records")
        return f"{number(per.max(), True)}% ({per.idxmax()})"
