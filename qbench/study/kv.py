"""The study's "KV cache" section, from result records only: `kv_section(records)` returns
markdown (registered in the STUDY.md writer, qbench/study/writer.py); `python -m qbench.study.kv [--results
results] [--out study/kv_cache.md]` writes it.

Tables (each cell against the fp32 record of the same model and protocol):
  - SmolLM2-135M: ppl, delta ppl, KL, top-1 agreement, cache bytes per token per scheme;
  - every arm of the tiny zoo and the bb-guo-cpu Bigram-Backcopy checkpoints: relative
    delta ppl (%) as the mean over training seeds with [min, max] and n; a "lead" is named
    only where one arm's whole range lies below every other arm's.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from qbench.eval.catalogue import is_native

KV_SCHEMES = ["kv8", "kv8-sink1", "kv4", "kv4-sink1", "kv2", "kv2-sink1", "kv2-g32", "kv2-g32-r128",
              "kv2-kivi-g32-r32", "kv2-kivi-g32-r32-sink1", "kv4-kivi-g32-r128", "kv2-kivi-g32-r128",
              "kv2-kivi-g32-r128-sink1", "w8a8-dyn", "w8a8-dyn-kv4", "w8a8-dyn-kv4-sink1"]  # composed: last
SMOLLM2 = "smollm2-135m"


def _ok_ppl(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(model, scheme, protocol) -> the perplexity record (the latest if several)."""
    out = {}
    for r in records:
        if r.get("status") == "ok" and r.get("task") == "ppl" and r.get("scheme") in KV_SCHEMES + ["fp32"]:
            key = (r["model"], r["scheme"], r["protocol"])
            if key not in out or r["provenance"]["finished_at"] > out[key]["provenance"]["finished_at"]:
                out[key] = r
    return out


def _relative(cells, model, scheme, protocol) -> float | None:
    q, fp = cells.get((model, scheme, protocol)), cells.get((model, "fp32", protocol))
    if q is None or fp is None:
        return None
    return 100.0 * (q["metrics"]["ppl"] - fp["metrics"]["ppl"]) / fp["metrics"]["ppl"]


def smollm2_table(cells) -> list[str]:
    protocols = sorted({p for (m, s, p) in cells if m == SMOLLM2 and s != "fp32"})
    lines = []
    for protocol in protocols:
        fp = cells.get((SMOLLM2, "fp32", protocol))
        if fp is None:
            continue
        lines += [f"SmolLM2-135M, protocol `{protocol}` ({fp['metrics']['tokens']} tokens; one checkpoint and one "
                  "text, so n = 1 per cell and no spread: differences of a few hundredths of a percent are noise-sized "
                  "claims, not leads); bytes per token are those of quantized tokens (scales and minima included) "
                  "summed over every layer and KV head:", "",
                  "| scheme | ppl | delta ppl | rel. delta % | KL | top-1 agreement | cache bytes/token (fp16: "
                  f"{_fp16_bytes(cells, SMOLLM2, protocol)}) |", "|---|---:|---:|---:|---:|---:|---:|",
                  f"| fp32 | {fp['metrics']['ppl']:.3f} | 0 | 0 | 0 | 1 | - |"]
        for scheme in KV_SCHEMES:
            r = cells.get((SMOLLM2, scheme, protocol))
            if r is None:
                continue
            m = r["metrics"]
            lines.append(f"| {scheme} | {m['ppl']:.3f} | {m['ppl'] - fp['metrics']['ppl']:+.3f} | "
                         f"{_relative(cells, SMOLLM2, scheme, protocol):+.2f} | {m.get('kl', float('nan')):.4f} | "
                         f"{m.get('top1_agreement', float('nan')):.4f} | "
                         f"{r['quantization'].get('kv_cache_bytes_per_token', '-')} |")
        lines.append("")
        for scheme in KV_SCHEMES:  # what keeping the sink exact does, scheme by scheme
            with_sink = cells.get((SMOLLM2, scheme + "-sink1", protocol))
            without = cells.get((SMOLLM2, scheme, protocol))
            if with_sink and without:
                lines.append(f"- keeping the first token exact, {scheme}: rel. delta ppl "
                             f"{_relative(cells, SMOLLM2, scheme, protocol):+.2f}% -> "
                             f"{_relative(cells, SMOLLM2, scheme + '-sink1', protocol):+.2f}%, KL "
                             f"{without['metrics']['kl']:.4f} -> {with_sink['metrics']['kl']:.4f}")
        lines.append("")
    return lines


def _fp16_bytes(cells, model, protocol):
    for (m, s, p), r in cells.items():
        if m == model and p == protocol and "kv_cache_fp16_bytes_per_token" in r.get("quantization", {}):
            return r["quantization"]["kv_cache_fp16_bytes_per_token"]
    return "-"


def task_table(records: list[dict]) -> list[str]:
    """SmolLM2's lm-eval cells under KV schemes (the same model path as perplexity)."""
    rows = {}
    for r in records:
        if (r.get("status") == "ok" and r.get("model") == SMOLLM2 and not is_native(r.get("task"))
                and r.get("scheme") in KV_SCHEMES + ["fp32"]):
            rows[(r["task"], r["protocol"], r["scheme"])] = r["metrics"]
    keys = sorted({(t, p) for (t, p, s) in rows if s != "fp32" and (t, p, "fp32") in rows})
    lines = []
    for task, protocol in keys:
        lines += [f"SmolLM2-135M on `{protocol}` through lm-eval (n = {rows[(task, protocol, 'fp32')]['items']} "
                  "items, one checkpoint):", "", "| scheme | accuracy | flip rate | recovery |", "|---|---:|---:|---:|",
                  f"| fp32 | {rows[(task, protocol, 'fp32')]['accuracy']:.3f} | - | - |"]
        for scheme in KV_SCHEMES:
            m = rows.get((task, protocol, scheme))
            if m:
                lines.append(f"| {scheme} | {m['accuracy']:.3f} | {m['flip_rate']:.3f} | {m['recovery']:.3f} |")
        lines.append("")
    return lines


def arm_of(model: str, zoo: dict) -> str:
    return (zoo.get(model) or {}).get("arm", model)


def _kl(cells, model, scheme, protocol) -> float | None:
    r = cells.get((model, scheme, protocol))
    return None if r is None or r["metrics"].get("kl") is None else 1000.0 * r["metrics"]["kl"]


METRICS = {  # name: (value of one cell, what the table says, unit, decimals)
    "rel": (_relative, "relative delta ppl % against each checkpoint's own fp32", "%", 2),
    "kl": (_kl, "KL(P_fp || P_q) x 1000 (nats) against each checkpoint's own fp32", "", 3),
}


def arm_table(cells, zoo: dict, prefix: str, title: str, metric: str = "rel") -> list[str]:
    """Rows: arms; columns: KV schemes; cells: the metric's mean over training seeds [min, max]
    (n); one table per protocol that has a KV-cache cell (seeds of one protocol are never
    pooled with another's)."""
    models = sorted({m for (m, s, p) in cells if m.startswith(prefix) and s != "fp32"
                     and (cells.get((m, "fp32", p)) is not None)})
    protocols = sorted({p for (m, s, p) in cells if m in models and (s.startswith("kv") or "-kv" in s)})
    lines: list[str] = []
    for protocol in protocols:
        lines += _arm_table(cells, zoo, models, protocol, title, metric)
    return lines


def _arm_table(cells, zoo: dict, models: list[str], protocol: str, title: str, metric: str) -> list[str]:
    value_of, what, unit, digits = METRICS[metric]
    schemes = [s for s in KV_SCHEMES if any((m, s, protocol) in cells for m in models)]
    if not schemes:
        return []
    by_arm: dict[str, dict[str, list[float]]] = {}
    for m in models:
        for s in schemes:
            value = value_of(cells, m, s, protocol)
            if value is not None:
                by_arm.setdefault(arm_of(m, zoo), {}).setdefault(s, []).append(value)
    lines = [f"{title} (protocol `{protocol}`): {what}, mean over training seeds [min, max] (n). A range that "
             "\"leads\" or \"trails\" below is descriptive: with fewer than 4 seeds per arm the study's verdict "
             "rule gives no verdict.", "",
             "| arm | " + " | ".join(schemes) + " |", "|---|" + "---:|" * len(schemes)]
    for arm in sorted(by_arm):
        row = []
        for s in schemes:
            values = by_arm[arm].get(s, [])
            row.append(f"{statistics.mean(values):+.{digits}f} [{min(values):+.{digits}f}, {max(values):+.{digits}f}] "
                       f"({len(values)})"
                       if values else "-")
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    lines.append("")
    lines += _leads(by_arm, schemes, unit, digits)
    return lines


def _separated(ranges: dict, lower: bool) -> list[str]:
    """The smallest set of at most half the arms whose ranges all lie below (`lower`) or above
    every other arm's range; [] if none."""
    order = sorted(ranges, key=lambda a: ranges[a][1] if lower else -ranges[a][0])
    for k in range(1, len(order) // 2 + 1):
        group, rest = order[:k], order[k:]
        if lower and max(ranges[a][1] for a in group) < min(ranges[a][0] for a in rest):
            return group
        if not lower and min(ranges[a][0] for a in group) > max(ranges[a][1] for a in rest):
            return group
    return []


def _leads(by_arm, schemes, unit: str = "%", digits: int = 2) -> list[str]:
    """For each scheme: the arm(s) whose [min, max] lie wholly below every other arm's (they
    lead) or wholly above (they trail), compared at the table's precision."""
    out = []
    for s in schemes:
        ranges = {a: (round(min(v[s]), digits), round(max(v[s]), digits))
                  for a, v in by_arm.items() if len(v.get(s, [])) >= 2}
        if len(ranges) < 2:
            continue
        said = []
        for lower, verb in ((True, "lead"), (False, "trail")):
            group = _separated(ranges, lower)
            if group:
                spans = ", ".join(f"{a} {ranges[a][0]:+.{digits}f}..{ranges[a][1]:+.{digits}f}{unit}" for a in group)
                said.append(f"{' and '.join(group)} {verb + 's' if len(group) == 1 else verb} ({spans}; "
                            f"{'below' if lower else 'above'} every other arm's range)")
        means = [statistics.mean(v[s]) for v in by_arm.values() if v.get(s)]
        out.append(f"- {s}: " + ("; ".join(said) if said else "no arm leads or trails (the ranges overlap)")
                   + f"; arm means {min(means):+.{digits}f}..{max(means):+.{digits}f}{unit}")
    return out + [""] if out else []


def kv_section(records: list[dict], zoo: dict | None = None) -> str:
    if zoo is None:
        from qbench.zoo import read_zoo

        zoo = read_zoo()
    cells = _ok_ppl(records)
    lines = ["## KV cache", "",
             "Every key and value quantized once as it enters the cache (asymmetric min-max, fp16 scale and "
             "minimum per group), attention over the dequantized values; `-sink1` keeps the first token's K and V "
             "exact, `-kivi-g32-r128` quantizes keys per channel over 32 tokens and keeps the last 128 tokens exact "
             "(docs/RESEARCH.md, \"Quantizing the KV cache\"). Formulas: `qbench list schemes`.", ""]
    lines += smollm2_table(cells)
    lines += task_table(records)
    lines += arm_table(cells, zoo, "tiny-", "Tiny zoo, every arm")
    lines += arm_table(cells, zoo, "tiny-", "Tiny zoo, every arm, the more sensitive measure", metric="kl")
    bb = ("Bigram-Backcopy (bb-guo-cpu; T = 64, so a 128-token window covers every query and the `-r128` "
          "schemes are exact here, while `-r32` quantizes keys older than 32 tokens)")
    lines += arm_table(cells, zoo, "bb-guo-cpu-", bb)
    lines += arm_table(cells, zoo, "bb-guo-cpu-", bb + ", the more sensitive measure", metric="kl")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default="study/kv_cache.md")
    args = parser.parse_args()
    from qbench.results import ResultStore

    Path(args.out).write_text(kv_section(ResultStore(args.results).records()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
