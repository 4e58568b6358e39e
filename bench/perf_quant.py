"""Speed of the quantized paths relative to fp32, measured in the same run (`make perf`).

Prints, as throughput ratios (fp32 time / path time; > 1 means faster than fp32):
  - the real int8 W8A8 linear under every exact int8 kernel (qbench.quant.int8_gemm:
    fbgemm / x86 engines, oneDNN _int_mm, the exact fp32 fallback) and the simulated one,
    at the tiny zoo's and SmolLM2-135M's linear shapes;
  - whole-model forwards (tiny-vga, smollm2-135m) under the real int8 scheme
    (w8a8-dyn-int8, the machine's chosen kernel) against fp32;
  - the low-precision attention kernel vs fp32 eager attention at T = 256 and 1024;
  - bitsandbytes (LLM.int8, NF4) and optimum-quanto (qint8 W8A8) linears.
Timings are medians of repeated runs after a warm-up; the CPU and thread count are printed
because the int8 results depend on the instruction set (AVX-512 VNNI / AMX or not).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def linear_rows(tokens: int, repeats: int):
    from qbench.quant.bnb import four_bit_linear, int8_linear
    from qbench.quant.simulated import DynamicQuantLinear

    shapes = {"tiny 256->1024": (256, 1024), "tiny 1024->256": (1024, 256),
              "smollm2 576->1536": (576, 1536), "smollm2 1536->576": (1536, 576)}
    from qbench.quant.int8_gemm import CANDIDATES, EXACT_TOLERANCE, available, exactness_error

    kernels = [k for k in CANDIDATES if available(k) and exactness_error(k) <= EXACT_TOLERANCE]
    for label, (n_in, n_out) in shapes.items():
        torch.manual_seed(0)
        linear = torch.nn.Linear(n_in, n_out).eval()
        x = torch.randn(tokens, n_in)
        with torch.no_grad():
            fp32 = median_seconds(lambda: linear(x), repeats)
            paths = {
                **{f"w8a8 int8 {k}": DynamicQuantLinear(linear, 8, 8, int8_matmul=True, kernel=k) for k in kernels},
                "w8a8 simulated": DynamicQuantLinear(linear, 8, 8, int8_matmul=False),
                "bnb llm-int8": int8_linear(linear, 6.0),
                "bnb nf4": four_bit_linear(linear, "nf4", torch.float32),
            }
            for name, module in paths.items():
                yield label, name, fp32, median_seconds(lambda: module(x), repeats)
            yield label, "quanto w8a8", fp32, median_seconds(_quanto_linear(linear, x), repeats)


def _quanto_linear(linear, x):
    import copy

    import optimum.quanto as quanto

    model = torch.nn.Sequential(copy.deepcopy(linear))
    quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
    with torch.no_grad(), quanto.Calibration():
        model(x)
    quanto.freeze(model)
    return lambda: model(x)


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
            with torch.no_grad():
                module.qbench_hooks, module.qbench_kernel = Eager(), None
                eager = median_seconds(lambda: module(x), repeats)
                module.qbench_hooks, module.qbench_kernel = None, LowBitAttention()
                kernel = median_seconds(lambda: module(x), repeats)
            yield f"attention T={t} {arm}", "lowbit kernel", eager, kernel


def model_rows(repeats: int):
    """Whole forwards: fp32 against the real int8 scheme (the kernel this machine chose)."""
    import copy

    from qbench.quant import quantize
    from qbench.zoo import load_model

    for name, batch in (("tiny-vga", (8, 256)), ("smollm2-135m", (4, 512))):
        try:
            loaded = load_model(name)
        except Exception as err:  # noqa: BLE001  a missing package model is reported, not fatal
            print(f"skip {name}: {err}")
            continue
        x = torch.randint(3, loaded.model.config.vocab_size, batch)
        quantized = copy.deepcopy(loaded.model)
        facts = quantize(quantized, "w8a8-dyn-int8")
        with torch.no_grad():
            fp32 = median_seconds(lambda: loaded.model(input_ids=x), max(3, repeats // 2))
            int8 = median_seconds(lambda: quantized(input_ids=x), max(3, repeats // 2))
        yield f"{name} forward {batch[0]}x{batch[1]}", f"w8a8-dyn-int8 ({facts['int8_kernel']})", fp32, int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the linear inputs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/PERF_QUANT.md")
    args = parser.parse_args()
    from qbench.quant.int8_gemm import cpu_signature

    flags = " ".join(cpu_signature()["flags"])
    header = (f"CPU: {cpu_name()} (flags: {flags}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{torch.backends.cpu.get_cpu_capability()} kernels")
    lines = ["# Quantized-path speed vs fp32 (same run)", "", header, "",
             "| shape | path | fp32 ms | path ms | throughput vs fp32 |", "|---|---|---:|---:|---:|"]
    print(header)
    rows = []
    for row in [*linear_rows(args.tokens, args.repeats), *model_rows(args.repeats), *attention_rows(args.repeats)]:
        rows.append(row)
        label, name, reference, seconds = row
        print(f"{label:28s} {name:26s} fp32 {reference * 1e3:8.2f} ms  path {seconds * 1e3:8.2f} ms  "
              f"ratio {reference / seconds:6.2f}x", flush=True)
    for label, name, reference, seconds in rows:
        ratio = reference / seconds
        lines.append(f"| {label} | {name} | {reference * 1e3:.2f} | {seconds * 1e3:.2f} | {ratio:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from sections import keep_sections  # bench/direct.py's section stays

    Path(args.out).write_text(keep_sections(Path(args.out), "\n".join(lines) + "\n",
                                            ["A quantized cell vs the library used directly"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
