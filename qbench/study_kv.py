"""The study's "KV cache" section, from result records only: `kv_section(records)` returns
markdown (the lead engineer wires it into STUDY.md); `python -m qbench.study_kv [--results
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

KV_SCHEMES = ["kv8", "kv8-sink1", "kv4", "kv4-sink1", "kv2", "kv2-sink1", "kv2-g32", "kv2-g32-r128",
              "kv4-kivi-g32-r128", "kv2-kivi-g32-r128", "kv2-kivi-g32-r128-sink1"]
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
    return lines


def _fp16_bytes(cells, model, protocol):
    for (m, s, p), r in cells.items():
        if m == model and p == protocol and "kv_cache_fp16_bytes_per_token" in r.get("quantization", {}):
            return r["quantization"]["kv_cache_fp16_bytes_per_token"]
    return "-"


def arm_of(model: str, zoo: dict) -> str:
    return (zoo.get(model) or {}).get("arm", model)


def arm_table(cells, zoo: dict, prefix: str, title: str) -> list[str]:
    """Rows: arms; columns: KV schemes; cells: mean rel. delta ppl % [min, max] (n seeds)."""
    models = sorted({m for (m, s, p) in cells if m.startswith(prefix) and s != "fp32"
                     and (cells.get((m, "fp32", p)) is not None)})
    if not models:
        return []
    protocols = sorted({p for (m, s, p) in cells if m in models})
    schemes = [s for s in KV_SCHEMES if any((m, s, p) in cells for m in models for p in protocols)]
    by_arm: dict[str, dict[str, list[float]]] = {}
    for m in models:
        for p in protocols:
            for s in schemes:
                value = _relative(cells, m, s, p)
                if value is not None:
                    by_arm.setdefault(arm_of(m, zoo), {}).setdefault(s, []).append(value)
    lines = [f"{title} (protocol{'s' if len(protocols) > 1 else ''} {', '.join(f'`{p}`' for p in protocols)}): "
             "relative delta ppl % against each checkpoint's own fp32, mean over training seeds [min, max] (n)", "",
             "| arm | " + " | ".join(schemes) + " |", "|---|" + "---:|" * len(schemes)]
    for arm in sorted(by_arm):
        row = []
        for s in schemes:
            values = by_arm[arm].get(s, [])
            row.append(f"{statistics.mean(values):+.2f} [{min(values):+.2f}, {max(values):+.2f}] ({len(values)})"
                       if values else "-")
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    lines.append("")
    lines += _leads(by_arm, schemes)
    return lines


def _leads(by_arm, schemes) -> list[str]:
    """For each scheme: the arm whose [min, max] lies wholly below every other arm's, if any."""
    out = []
    for s in schemes:
        ranges = {a: (min(v[s]), max(v[s])) for a, v in by_arm.items() if len(v.get(s, [])) >= 2}
        if len(ranges) < 2:
            continue
        best = min(ranges, key=lambda a: ranges[a][1])
        if all(ranges[best][1] < lo for a, (lo, _) in ranges.items() if a != best):
            out.append(f"- {s}: {best} leads (its range {ranges[best][0]:+.2f}..{ranges[best][1]:+.2f}% lies below "
                       "every other arm's)")
        else:
            worst = max(ranges, key=lambda a: ranges[a][0])
            out.append(f"- {s}: no arm leads (ranges overlap); highest floor {worst} at {ranges[worst][0]:+.2f}%")
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
             "(README, \"Quantizing the KV cache\"). Formulas: `qbench list schemes`.", ""]
    lines += smollm2_table(cells)
    lines += arm_table(cells, zoo, "tiny-", "Tiny zoo, every arm")
    lines += arm_table(cells, zoo, "bb-guo-cpu-", "Bigram-Backcopy (bb-guo-cpu, T = 64: a 128-token residual "
                                                  "window covers every query, so the KIVI schemes are exact here)")
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
