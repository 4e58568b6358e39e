"""Suite-level performance, each number a ratio against a reference measured in the same
run (`make perf` runs this after bench/perf_quant.py); writes results/PERF.md.

1. Evaluation throughput with every probe attached vs a bare forward loop over the same
   windows (target >= 0.8).
2. Per-cell overhead of the result store (write + validated read of a real record) and of
   `qbench report`'s table over the store, as a share of one real cell's compute time.
3. Peak memory vs the number of evaluation samples for the probes (each size in a fresh
   process, peak RSS above the process' baseline after loading the model): must stay flat
   because every statistic is a running sum.
The quantized-path speed (real int8, the attention kernel) is in results/PERF_QUANT.md.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf_quant import cpu_name  # noqa: E402

MODEL = "tiny-vga"
# The probe-throughput row also runs on a checkpoint whose activations pass |x| >= 6, so the
# outlier counts (skipped exactly where the peak stays below 6) are paid for too.
OUTLIER_MODEL = "small-softmax-3k"


def _windows(loaded, n: int, window: int = 64) -> list[torch.Tensor]:
    from qbench.eval.catalogue import get_task
    from qbench.eval.protocols import resolve_protocol
    from qbench.eval.perplexity import protocol_windows

    protocol = get_task("probes").protocol(resolve_protocol(loaded, None))
    windows, _, _ = protocol_windows(protocol, loaded.tokenizer)
    full = [w for w in windows if len(w) == window]
    return (full * (n // len(full) + 1))[:n]


def probe_overhead(repeats: int, n: int, name: str = MODEL) -> tuple[float, float]:
    from qbench.probes import run_probes
    from qbench.zoo import load_model

    loaded = load_model(name)
    model = loaded.model.eval()
    windows = _windows(loaded, n)

    @torch.no_grad()
    def bare():
        for i in range(0, len(windows), 8):  # run_probes' batch size
            model(torch.stack(windows[i: i + 8]))

    def probed():
        run_probes(model, windows, batch_size=8)

    times = {"bare": [], "probes": []}
    bare()
    probed()  # warm-up
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for name, fn in (("bare", bare), ("probes", probed)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["bare"]), statistics.median(times["probes"])


def store_overhead(tmp: Path, cells: int) -> tuple[float, float, float]:
    """(seconds of one real ppl cell, store put+get per cell, report table per cell)."""
    import copy

    from qbench.runner import run_bench
    from qbench.report import comparison_table
    from qbench.results import ResultStore

    store = ResultStore(tmp / "one")
    start = time.perf_counter()
    [record] = run_bench([MODEL], ["w8a8-dyn"], ["ppl"], store, limit=4000, progress=False)
    cell = time.perf_counter() - start
    many = ResultStore(tmp / "many")
    start = time.perf_counter()
    for i in range(cells):
        r = copy.deepcopy(record)
        r["config"] = {**r["config"], "perf_copy": i}
        from qbench.results import cell_key

        r["key"] = cell_key(r["config"])
        many.put(r)
        assert many.get(r["key"]) is not None
    put_get = (time.perf_counter() - start) / cells
    start = time.perf_counter()
    comparison_table(many.records())
    report = (time.perf_counter() - start) / cells
    return cell, put_get, report


def _peak_child(n: int, queue) -> None:
    from qbench.probes import run_probes
    from qbench.zoo import load_model

    torch.set_num_threads(1)
    loaded = load_model(MODEL)
    windows = _windows(loaded, n)
    run_probes(loaded.model, windows[:8], batch_size=8)  # allocator warm-up at the same batch shape
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_probes(loaded.model, windows, batch_size=8)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def peak_memory(sizes: list[int]) -> list[tuple[int, float]]:
    ctx = mp.get_context("spawn")
    out = []
    for n in sizes:
        queue = ctx.Queue()
        process = ctx.Process(target=_peak_child, args=(n, queue))
        process.start()
        out.append((n, queue.get(timeout=1800)))
        process.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--cells", type=int, default=200, help="records written for the store overhead")
    parser.add_argument("--sizes", default="16,64,256", help="sample counts for the peak-memory curve")
    parser.add_argument("--out", default="results/PERF.md")
    parser.add_argument("--note", default="", help="a line about the conditions (e.g. other jobs running)")
    args = parser.parse_args()
    import tempfile

    header = (f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"model {MODEL}")
    print(header)
    throughput = []
    threads = torch.get_num_threads()
    for count in sorted({1, threads}):  # the statistics' elementwise passes scale worse than GEMMs
        torch.set_num_threads(count)
        for name in (MODEL, OUTLIER_MODEL):
            bare, probed = probe_overhead(args.repeats, args.windows, name)
            throughput.append((f"{name}, {count} thread{'s' if count > 1 else ''}", bare, probed, bare / probed))
            print(f"{throughput[-1][0]}: probes on {probed:.3f} s vs bare {bare:.3f} s for {args.windows} windows "
                  f"-> throughput ratio {bare / probed:.2f}")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cell, put_get, report = store_overhead(Path(tmp), args.cells)
    print(f"cell {cell:.2f} s; store {put_get * 1e3:.2f} ms/cell; report {report * 1e3:.2f} ms/cell")
    sizes = [int(s) for s in args.sizes.split(",")]
    memory = peak_memory(sizes)
    for n, mb in memory:
        print(f"probes on {n:5d} samples: peak RSS +{mb:.1f} MB")
    growth = memory[-1][1] - memory[0][1]
    lines = ["# Suite performance (ratios measured in the same run)", "", header, "",
             *([args.note, ""] if args.note else []),
             "| measurement | reference | measured | ratio | target |", "|---|---:|---:|---:|---|",
             *[f"| eval throughput with all probes vs bare forward, {name} ({args.windows} windows of 64 tokens) | "
               f"{bare:.3f} s | {probed:.3f} s | {ratio:.2f} | >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'} |"
               for name, bare, probed, ratio in throughput],
             f"| result store write + validated read, per cell | one w8a8-dyn ppl cell {cell:.2f} s | "
             f"{put_get * 1e3:.2f} ms | {put_get / cell:.2%} of the cell | small |",
             f"| report table over {args.cells} records, per cell | {cell:.2f} s | {report * 1e3:.2f} ms | "
             f"{report / cell:.2%} of the cell | small |", "",
             "Peak RSS while probing N samples, above the peak of a warm-up pass on 8 samples at the same batch shape (fresh process per size; 0 = no growth at all):", "",
             "| samples | peak RSS increase (MB) |", "|---:|---:|"]
    lines += [f"| {n} | {mb:.1f} |" for n, mb in memory]
    lines += ["", f"Growth from {sizes[0]} to {sizes[-1]} samples: {growth:+.1f} MB "
              f"({'flat' if abs(growth) < 0.25 * max(1.0, memory[0][1]) + 20 else 'NOT flat'}: "
              "every probe statistic is a running sum).", "",
             "Quantized paths vs fp32: [PERF_QUANT.md](PERF_QUANT.md)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from sections import keep_sections  # bench/: the stress script's "Robustness" section stays

    Path(args.out).write_text(keep_sections(Path(args.out), "\n".join(lines) + "\n", ["Robustness"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
