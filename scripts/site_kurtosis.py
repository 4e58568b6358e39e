"""Kurtosis and peak of layer 0's attention output (o_proj input and output) and block
output, per checkpoint: where the output-gated arms' high layer-0 kurtosis (the probes'
per-layer maximum over sites) sits.  One calibration batch of 16 x 64 tokens (seed 0).

    python scripts/site_kurtosis.py tiny-vga-out tiny-qwen-g1 tiny-softmax tiny-vga
"""
from __future__ import annotations

import sys

import torch

from qbench.data.calibration import calibration_source
from qbench.zoo import load_model


def kurtosis(x: torch.Tensor) -> float:
    """Per sample E[(x - mu)^4] / sigma^4 over the flattened tensor, averaged (the probes' definition)."""
    x = x.reshape(x.shape[0], -1).float()
    centred = x - x.mean(1, keepdim=True)
    var = centred.pow(2).mean(1)
    return float((centred.pow(4).mean(1) / (var * var + 1e-6)).mean())


def main(names: list[str]) -> None:
    print("| checkpoint | o_proj input kurtosis | o_proj output kurtosis | block output kurtosis | "
          "o_proj input max abs | share of o_proj inputs below 0.01 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        loaded = load_model(name)
        model = loaded.model.eval()
        batch = calibration_source("sotu", loaded.tokenizer, 64)(1, 0, 16)[0]
        acts = {}
        layer = model.model.layers[0]
        handles = [layer.attn.o_proj.register_forward_hook(lambda m, i, o: acts.update(o_in=i[0], o_out=o)),
                   layer.register_forward_hook(lambda m, i, o: acts.update(block=o))]
        with torch.no_grad():
            model(input_ids=batch)
        for h in handles:
            h.remove()
        o_in = acts["o_in"]
        print(f"| {name} | {kurtosis(o_in):.1f} | {kurtosis(acts['o_out']):.1f} | {kurtosis(acts['block']):.1f} | "
              f"{o_in.abs().max().item():.2f} | {(o_in.abs() < 0.01).float().mean().item():.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny-vga-out", "tiny-vga-out-s1", "tiny-qwen-g1", "tiny-qwen-g1-s1", "tiny-softmax",
                          "tiny-softmax-s1", "tiny-vga", "tiny-iga"])
