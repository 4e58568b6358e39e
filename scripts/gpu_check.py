"""Where a GPU exists: bench smollm2-135m on it under fp32 and every 8-bit and 4-bit scheme,
and check each GPU perplexity against the CPU record of the same cell in results/.

    python scripts/gpu_check.py                 # --device cuda, writes results/GPU_CHECK.md
    python scripts/gpu_check.py --dry-run       # the same pipeline on the CPU, tiny-vga, minutes

The GPU records go to their own store (results/gpu by default): the device is provenance,
not part of a cell's key, so a GPU record has the CPU record's key and must not replace it.

Tolerances (relative perplexity difference, GPU vs CPU):
  fp32: 1e-4.  Same weights and tokens; only the summation order of the GEMMs and the
        attention differs (TF32 is off), which moves a 5,000-token log-likelihood sum by
        ~1e-6 relative per token; 1e-4 leaves two orders of margin.
  quantized: 1%.  The same rounding rules, but an activation that lands within an ulp of a
        rounding boundary can round the other way under a different summation order, and
        bitsandbytes and quanto run different kernels on CUDA (LLM.int8's fp16 outlier
        matmul, quanto's CUDA int8 path) than on the CPU.  The CPU records themselves move
        by up to ~0.5% between calibration draws, so 1% is the spread we can defend.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FP_TOLERANCE, QUANT_TOLERANCE = 1e-4, 1e-2


def low_bit_schemes() -> list[str]:
    """fp32 and every 8-bit and 4-bit scheme of the catalogue (6-bit and bf16 left out)."""
    from qbench.quant import SCHEMES

    out = ["fp32"]
    for name, scheme in SCHEMES.items():
        bits = {b for b in (scheme.weight_bits, scheme.activation_bits) if b}
        if scheme.backend != "reference" and bits and bits <= {4, 8}:
            out.append(name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", default=None, help="comma-separated (default: fp32 + every 8- and 4-bit scheme)")
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--cpu-results", default=str(ROOT / "results"), help="store with the CPU records")
    parser.add_argument("--results", default=str(ROOT / "results" / "gpu"), help="store for the device's records")
    parser.add_argument("--out", default=str(ROOT / "results" / "GPU_CHECK.md"))
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU only: tiny-vga, three schemes, 3000 characters, CPU reference computed fresh")
    args = parser.parse_args()
    from qbench.runner import run_bench
    from qbench.device import device_name, resolve_device
    from qbench.results import ResultStore

    schemes = args.schemes.split(",") if args.schemes else low_bit_schemes()
    if args.dry_run:
        args.device, args.model, args.limit = "cpu", "tiny-vga", 3000
        schemes = args.schemes.split(",") if args.schemes else ["fp32", "w8a8-dyn", "w4-rtn-g64"]
        scratch = Path(tempfile.mkdtemp(prefix="qbench-gpu-check-"))
        args.cpu_results, args.results, args.out = scratch / "cpu", scratch / "device", scratch / "GPU_CHECK.md"
        run_bench([args.model], schemes, ["ppl"], ResultStore(args.cpu_results), limit=args.limit, progress=False)
    from qbench.validate import UsageError

    start = time.time()
    try:  # an unusable device, or a scheme it cannot run, is refused before any work
        device = resolve_device(args.device)
        records = run_bench([args.model], schemes, ["ppl"], ResultStore(args.results), limit=args.limit,
                            progress=True, device=device)
    except UsageError as err:  # one line, exit 2 (README, exit codes)
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    cpu = ResultStore(args.cpu_results)
    rows, failures = [], 0
    for record in records:
        reference = cpu.get(record["key"])
        tolerance = FP_TOLERANCE if record["scheme"] in ("fp32",) else QUANT_TOLERANCE
        if record.get("status") != "ok":
            verdict, diff, cpu_ppl = f"FAILED on device: {record.get('error', '')[:80]}", None, None
        elif reference is None or reference.get("status") != "ok":
            verdict, diff, cpu_ppl = "no CPU record to compare (run it on the CPU first)", None, None
        else:
            cpu_ppl = reference["metrics"]["ppl"]
            diff = abs(record["metrics"]["ppl"] - cpu_ppl) / cpu_ppl
            verdict = "ok" if diff <= tolerance else f"DIFFERS (> {tolerance:g})"
        failures += not verdict.startswith(("ok", "no CPU"))
        device_ppl = record.get("metrics", {}).get("ppl")
        rows.append(f"| {record['scheme']} | {cpu_ppl if cpu_ppl is None else f'{cpu_ppl:.4f}'} | "
                    f"{device_ppl if device_ppl is None else f'{device_ppl:.4f}'} | "
                    f"{'-' if diff is None else f'{diff:.2e}'} | {tolerance:g} | {verdict} |")
    lines = [f"# {args.model} on {device_name(device)} vs the CPU records", "",
             f"{len(records)} cells, first {args.limit} characters of the test split, {time.time() - start:.0f} s"
             + (" (dry run on the CPU)" if args.dry_run else ""), "",
             "| scheme | CPU ppl | device ppl | relative difference | tolerance | verdict |", "|---|---:|---:|---:|---:|---|",
             *rows]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
