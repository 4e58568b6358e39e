"""A quantized perplexity cell through qbench against the same library used directly on the
same text, in one process (`make perf`).  Target: qbench within 1.5x of direct use.

Direct use is what a user would write by hand: copy the fp32 model, swap its linears for
bitsandbytes' `Linear8bitLt` / `Linear4bit` (or fake-quantize them per channel / per token
for w8a8-dyn, which no library provides), tokenize the text once, run 255-token windows
after BOS, and compute perplexity plus KL and top-1 agreement against the fp32 model in
lockstep.  qbench's cell does the same with its FP reference cache warm (the fp32 cell of
the model ran before: the steady state of a benchmark that runs many schemes per model).
Both sides pay their imports before timing starts.  Prints a table with the CPU and the
thread count; writes it to results/PERF_QUANT.md when asked (--write).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def swap_linears(model, make):
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head and type(module).__name__ != "GateLinear":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(module))
    return model


def direct_bnb(linear, scheme):
    import bitsandbytes as bnb

    if scheme == "llm-int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False)
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False, blocksize=64)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu").eval()


class FakeW8A8(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach()
        s = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.weight, self.bias = torch.clamp(torch.round(w / s), -127, 127) * s, linear.bias

    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return F.linear(torch.clamp(torch.round(x / s), -127, 127) * s, self.weight, self.bias)


@torch.no_grad()
def direct_cell(model, tokenizer, text, scheme, window=256, batch=8):
    start = time.perf_counter()
    quantized = copy.deepcopy(model)
    swap_linears(quantized, FakeW8A8 if scheme == "w8a8-dyn" else lambda m: direct_bnb(m, scheme))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = [torch.cat([torch.tensor([bos]), ids[i:i + window - 1]]) for i in range(0, len(ids), window - 1)]
    nll, tokens, kl, agree = 0.0, 0, 0.0, 0
    groups = []  # windows of one length together, batch at a time (the last, shorter one alone)
    for w in windows:
        if groups and len(groups[-1]) < batch and len(groups[-1][0]) == len(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    for group in groups:
        x = torch.stack(group)
        log_q = F.log_softmax(quantized(input_ids=x).logits[:, :-1].float(), -1)
        log_p = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        target = x[:, 1:]
        nll -= log_q.gather(-1, target[..., None]).sum().item()
        tokens += target.numel()
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
    return time.perf_counter() - start, math.exp(nll / tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-vga,smollm2-135m")
    parser.add_argument("--schemes", default="llm-int8,nf4,w8a8-dyn")
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", default=None, help="results/PERF_QUANT.md: put the table in its section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import os
    import tempfile

    os.environ.setdefault("QBENCH_CACHE", tempfile.mkdtemp(prefix="qbench-direct-"))
    import bitsandbytes  # noqa: F401  imports paid before timing, on both sides

    from perf_quant import cpu_name
    from qbench.runner import run_cell
    from qbench.data import load_corpus
    from qbench.data.tokens import split_text
    from qbench.plan import plan_cells
    from qbench.zoo import load_model

    rows = []
    for name in args.models.split(","):
        loaded = load_model(name)
        [fp_cell] = plan_cells([name], ["fp32"], ["ppl"], args.limit)
        run_cell(loaded, fp_cell, False)  # fills the FP reference cache
        text = split_text(load_corpus(fp_cell.protocol.corpus), fp_cell.protocol.split, args.limit)
        for scheme in args.schemes.split(","):
            [planned] = plan_cells([name], [scheme], ["ppl"], args.limit)
            start = time.perf_counter()
            record = run_cell(loaded, planned, False)
            ours = time.perf_counter() - start
            theirs, ppl = direct_cell(loaded.model, loaded.tokenizer, text, scheme)
            rows.append((name, scheme, ours, theirs, record["metrics"]["ppl"], ppl))
            print(f"{name:14s} {scheme:9s} qbench {ours:7.2f} s  direct {theirs:7.2f} s  ratio {ours / theirs:5.2f}  "
                  f"ppl {record['metrics']['ppl']:.3f} vs {ppl:.3f}", flush=True)
    lines = [f"CPU: {cpu_name()}; threads {args.threads}; text: first {args.limit} characters of the test split; "
             "target: qbench cell <= 1.5x direct use", "",
             "| model | scheme | qbench cell s | direct s | qbench / direct | ppl qbench | ppl direct |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {scheme} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x | {p1:.3f} | {p2:.3f} |"
              for name, scheme, ours, theirs, p1, p2 in rows]
    print("\n" + "\n".join(lines))
    if args.write:
        from sections import replace_section

        replace_section(Path(args.write), "A quantized cell vs the library used directly", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
