"""Speed of the quantized paths, measured in the same run (`make perf`), at 1 and 2 threads.

Every row is a path timed against two baselines measured right before it on the same
input: the fp32 linear (or forward) and its bf16 twin (the baseline users of AMX / AVX-512
BF16 machines compare against).  Ratios are throughput, baseline time / path time (> 1:
faster).  Rows:
  - linears at SmolLM2-135M's four shapes and the tiny zoo's two (2,048 rows): qbench's real
    int8 W8A8 layer (the kernel and fused passes a cell runs here, and every other exact
    kernel), the simulated layer, optimum-quanto's W8A8, torchao's int8 dynamic W8A8,
    bitsandbytes LLM.int8 and NF4, and the machine's int8 ceiling: the packed int8 GEMM
    alone on ready codes (no activation quantization, no rescale);
  - whole forwards (tiny-vga, smollm2-135m) in bf16 and under w8a8-dyn-int8;
  - the low-precision attention kernel against fp32 eager attention at T = 256 and 1024;
  - one whole perplexity cell (smollm2-135m, w8a8-dyn-int8) against a bare fp32 forward over
    the same windows.
Timings are medians after a warm-up; a path and its baselines are timed in turn (interleaved),
so drift of the machine lands on both.  The CPU model, its int8/bf16 flags and the kernels
torch dispatches to are printed and written, because int8 speed depends on them.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LINEAR_SHAPES = {"smollm2 576->576": (576, 576), "smollm2 576->192": (576, 192),
                 "smollm2 576->1536": (576, 1536), "smollm2 1536->576": (1536, 576),
                 "tiny 256->1024": (256, 1024), "tiny 1024->256": (1024, 256)}


def interleaved(fns, repeats: int) -> list[float]:
    """Median seconds of each function, timed in turn (a, b, c, a, b, c, ...) after two
    warm-up rounds: a baseline and its path see the same machine state, so a slow spell
    (another tenant, frequency) lands on both instead of on one of them."""
    for _ in range(2):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _quanto(linear, x):
    import optimum.quanto as quanto

    model = torch.nn.Sequential(copy.deepcopy(linear))
    quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
    with torch.no_grad(), quanto.Calibration():
        model(x)
    quanto.freeze(model)
    return model


def _torchao(linear):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = torch.nn.Sequential(copy.deepcopy(linear))
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def warm_allocator() -> None:
    """Put glibc's allocator where a model's forward leaves it, for every row whatever part
    runs first: freeing a mapped block raises malloc's mmap threshold to its size (up to
    32 MiB), after which blocks of that size come from the heap instead of fresh pages that
    fault on first touch.  Measured without this, the fp32 attention baseline at T = 1024 took
    20 ms before the model rows and 13 ms after them in the same process (2 threads)."""
    for mib in (4, 8, 16, 31):
        block = torch.empty(mib << 18)  # float32: mib MiB
        block.zero_()
        del block


def with_fusion(module, mode: str):
    """`module` run with QBENCH_INT8_FUSION=`mode` (read on every call)."""
    def run(x):
        previous = os.environ.get("QBENCH_INT8_FUSION")
        os.environ["QBENCH_INT8_FUSION"] = mode
        try:
            return module(x)
        finally:
            if previous is None:
                os.environ.pop("QBENCH_INT8_FUSION", None)
            else:
                os.environ["QBENCH_INT8_FUSION"] = previous
    return run


def linear_rows(tokens: int, repeats: int):
    from qbench.quant.bnb import four_bit_linear, int8_linear
    from qbench.quant.int8_fused import quantize_rows, shared_codes
    from qbench.quant.int8_gemm import CANDIDATES, EXACT_TOLERANCE, available, exactness_error
    from qbench.quant.simulated import DynamicQuantLinear

    kernels = [k for k in CANDIDATES if available(k) and exactness_error(k) <= EXACT_TOLERANCE]
    for label, (n_in, n_out) in LINEAR_SHAPES.items():
        torch.manual_seed(0)
        linear = torch.nn.Linear(n_in, n_out).eval()
        x = torch.randn(tokens, n_in)
        bf16, x_bf16 = copy.deepcopy(linear).bfloat16(), x.bfloat16()
        with torch.no_grad():
            chosen = DynamicQuantLinear(linear, 8, 8, int8_matmul=True)  # what a cell runs here
            codes, _ = quantize_rows(x, True, chosen.gemm.zero_point, chosen.gemm.input_dtype)
            paths = {f"qbench int8 ({chosen.kernel}, as a cell runs)": chosen,
                     f"qbench int8 ({chosen.kernel}), compiled passes instead of the native kernel":
                         with_fusion(chosen, "compiled"),
                     **{f"qbench int8 {k}": DynamicQuantLinear(linear, 8, 8, int8_matmul=True, kernel=k)
                        for k in kernels if k != chosen.kernel},
                     f"int8 GEMM alone ({chosen.kernel}: the ceiling)": lambda _x: chosen.gemm(codes),
                     "qbench simulated w8a8": DynamicQuantLinear(linear, 8, 8, int8_matmul=False),
                     "optimum-quanto w8a8": _quanto(linear, x),
                     "torchao int8 dynamic": _torchao(linear),
                     "bnb llm-int8": int8_linear(linear, 6.0),
                     "bnb nf4": four_bit_linear(linear, "nf4", torch.float32)}
            for name, module in paths.items():
                # baselines timed in turn with each path: drift cancels.  Every call quantizes its
                # input: the cache that lets q, k and v share one quantization would otherwise
                # serve the repeated x from the call before
                yield label, name, *interleaved([lambda: linear(x), lambda: bf16(x_bf16),
                                                 lambda: (shared_codes.clear(), module(x))[1]], repeats)
            # the ceiling of any W8A8 with per-token scales computed at run time: the input read
            # once (its row maxima) plus the packed GEMM; the fp32 GEMM reads it too, but at its
            # compute rate, so at narrow outputs this read bounds the ratio
            # (x.amax: one vectorised read; x.abs().amax reads twice and writes a temporary)
            fp32, half, read, gemm = interleaved([lambda: linear(x), lambda: bf16(x_bf16),
                                                  lambda: x.amax(dim=1), lambda: chosen.gemm(codes)], repeats)
            yield label, "one read of the fp32 input + int8 GEMM alone (the dynamic-quantization ceiling)", \
                fp32, half, read + gemm
            if label.startswith("smollm2 576->"):  # q/k/v and gate/up: siblings read one input
                shared = f"qbench int8 ({chosen.kernel}), input quantized by a sibling layer (as in the model)"
                yield label, shared, *interleaved([lambda: linear(x), lambda: bf16(x_bf16), lambda: chosen(x)], repeats)


def model_rows(repeats: int, names):
    """Whole forwards: fp32 against bf16 and the real int8 scheme (the kernel chosen here)."""
    from qbench.quant import quantize
    from qbench.zoo import load_model

    for name, batch in names:
        try:
            loaded = load_model(name)
        except Exception as err:  # noqa: BLE001  a missing package model is reported, not fatal
            print(f"skip {name}: {err}")
            continue
        model = loaded.model.eval()
        x = torch.randint(3, model.config.vocab_size, batch)
        half = copy.deepcopy(model).bfloat16()
        quantized = copy.deepcopy(model)
        facts = quantize(quantized, "w8a8-dyn-int8")
        r = max(3, repeats // 2)
        with torch.no_grad():
            head = model.get_output_embeddings()
            hidden = torch.randn(*batch, head.in_features)
            fp32, bf16, int8, head_s = interleaved([lambda: model(input_ids=x), lambda: half(input_ids=x),
                                                    lambda: quantized(input_ids=x), lambda: head(hidden)], r)
        label = f"{name} forward {batch[0]}x{batch[1]}"
        yield label, "bf16 forward", fp32, bf16, bf16
        yield label, f"w8a8-dyn-int8 ({facts['int8_kernel']}, {facts.get('int8_fusion')})", fp32, bf16, int8
        yield label, "its fp32 LM head alone (left in fp32 by the scheme)", fp32, bf16, head_s


def attention_rows(repeats: int):
    from qbench.modeling import QBenchConfig
    from qbench.modeling.model import QBenchAttention
    from qbench.quant.lowbit_attention import LowBitAttention

    class Eager:  # the explicit float path: scores, softmax, P V
        def scores(self, s): return s
        def probs(self, p): return p
        def context(self, c): return c

    for t in (256, 1024):
        for arm in ("softmax", "vga"):
            torch.manual_seed(0)
            module = QBenchAttention(QBenchConfig(d_model=256, n_head=4, attention=arm,
                                                  max_position_embeddings=t), 0).eval()
            x = torch.randn(1, t, 256)
            kernel = LowBitAttention()

            def run(hooks, path, autocast=False):
                module.qbench_hooks, module.qbench_kernel = hooks, path
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    return module(x)
            with torch.no_grad():
                # calls of ~2 ms at T = 256: more rounds for a stable median
                eager, half, kernel = interleaved([lambda: run(Eager(), None), lambda: run(Eager(), None, True),
                                                   lambda: run(None, kernel)], repeats * (8 if t <= 256 else 2))
            yield f"attention T={t} {arm}", "lowbit kernel (vs fp32 eager)", eager, half, kernel


def cell_rows(model_name: str = "smollm2-135m", limit: int = 20000):
    """One real w8a8-dyn-int8 perplexity cell (fresh store; its fp32 reference cell ran
    first, as in any campaign) against a bare fp32 forward over the same windows."""
    import tempfile

    from qbench.runner import run_planned
    from qbench.eval.perplexity import protocol_windows
    from qbench.plan import plan_cells
    from qbench.results import ResultStore

    try:
        cells = plan_cells([model_name], ["fp32", "w8a8-dyn-int8"], ["ppl"], limit=limit)
        loaded = cells[0].model_ref.load()
    except Exception as err:  # noqa: BLE001  a missing package model is reported, not fatal
        print(f"skip the cell row: {err}")
        return
    windows, _, _ = protocol_windows(cells[0].protocol, loaded.tokenizer)
    with torch.no_grad():
        start = time.perf_counter()
        batch = getattr(cells[0].protocol, "batch_size", 8)
        for i in range(0, len(windows), batch):  # the cell's batching: equal-length windows together
            group = windows[i:i + batch]
            for length in dict.fromkeys(len(w) for w in group):
                loaded.model(input_ids=torch.stack([w for w in group if len(w) == length]))
        bare = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        store = ResultStore(Path(folder))
        run_planned(cells[0], store)  # the model stays loaded: only the quantized cell is timed
        start = time.perf_counter()
        record = run_planned(cells[1], store)
        cell = time.perf_counter() - start
    if record.get("status", "ok") != "ok":
        print(f"the w8a8-dyn-int8 cell failed: {record.get('error')}")
        return
    yield (f"{model_name} ppl cell, {len(windows)} windows", "whole w8a8-dyn-int8 cell (quantize, forward, KL) "
           "vs bare fp32 forward", bare, None, cell)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the linear inputs")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", default="1,2", help="thread counts, each measured in this run, each in a "
                        "process of its own (users run one thread count per process; measured in one process "
                        "after the 1-thread part, the 2-thread rows were up to 4x slower than in a fresh "
                        "process: attention at T = 256 6.4 ms vs 1.5-1.9)")
    parser.add_argument("--rows-to", help=argparse.SUPPRESS)  # one thread count's rows, for the parent run
    parser.add_argument("--skip", default="", help="comma list of parts to skip: linear,model,attention,cell")
    parser.add_argument("--out", default="results/PERF_QUANT.md")
    args = parser.parse_args()
    from qbench.quant.int8_gemm import cpu_signature

    skip = set(filter(None, args.skip.split(",")))
    flags = " ".join(cpu_signature()["flags"])
    header = (f"CPU: {cpu_name()} (flags: {flags}); torch {torch.__version__}; "
              f"{torch.backends.cpu.get_cpu_capability()} kernels")
    lines = ["# Quantized-path speed (same run)", "", header, "",
             "Throughput ratios: baseline time / path time (> 1 is faster). fp32 and bf16 baselines are "
             "timed in turn with every row's path (interleaved, medians); each thread count runs in a "
             "process of its own, its allocator first put where a model's forward leaves it. The ceiling "
             "row is the packed int8 GEMM alone on ready codes; the "
             "dynamic-quantization ceiling adds one read of the fp32 input (its row maxima), which any "
             "W8A8 with per-token scales computed at run time must do.", "",
             "| threads | shape | path | fp32 ms | bf16 ms | path ms | vs fp32 | vs bf16 |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    print(header)
    counts = [int(t) for t in args.threads.split(",")]
    if len(counts) > 1 or not args.rows_to:  # the parent: one child process per thread count
        import subprocess
        import tempfile

        for threads in counts:
            with tempfile.NamedTemporaryFile("r", suffix=".md") as rows:
                subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                                "--threads", str(threads), "--skip", args.skip, "--rows-to", rows.name], check=True)
                lines += rows.read().splitlines()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from sections import keep_sections  # bench/direct.py's section stays

        Path(args.out).write_text(keep_sections(Path(args.out), "\n".join(lines) + "\n",
                                                ["A quantized cell vs the library used directly"]))
        print(f"wrote {args.out}")
        return
    rows = []
    threads = counts[0]  # a child: one thread count
    torch.set_num_threads(threads)
    warm_allocator()
    parts = []
    if "linear" not in skip:
        parts.append(linear_rows(args.tokens, args.repeats))
    if "model" not in skip:
        parts.append(model_rows(args.repeats, (("tiny-vga", (8, 256)), ("smollm2-135m", (4, 512)))))
    if "attention" not in skip:
        parts.append(attention_rows(args.repeats))
    if "cell" not in skip and threads == 1:
        parts.append(cell_rows())
    for part in parts:
        for label, name, fp32, bf16, seconds in part:
            half = f"{bf16 * 1e3:.2f}" if bf16 else "-"
            vs_half = f"{bf16 / seconds:.2f}x" if bf16 else "-"
            line = (f"| {threads} | {label} | {name} | {fp32 * 1e3:.2f} | {half} | {seconds * 1e3:.2f} | "
                    f"{fp32 / seconds:.2f}x | {vs_half} |")
            print(line, flush=True)
            rows.append(line)
    Path(args.rows_to).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
