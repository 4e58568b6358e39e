"""Train the study's checkpoints one after another, skipping finished ones and resuming
interrupted ones: `python scripts/train_queue.py --worker 0/2` and `--worker 1/2` split
the queue between two processes (one CPU thread each).

Naming: seed 0 is `models/<preset>-<arm>`, seed s > 0 is `models/<preset>-<arm>-s<s>`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qbench.modeling.attention import ATTENTION_ARMS

# The Bigram-Backcopy study's arms (a choice of the study, checked against the registry);
# the tiny zoo trains every registered arm.
BB_ARMS = ["softmax", "vga", "iga", "vga_out"]
assert set(BB_ARMS) <= set(ATTENTION_ARMS), "BB_ARMS names an arm the registry lacks"
TINY_ARMS = list(ATTENTION_ARMS)
# Issue 16's CPU fallback at Guo et al.'s recipe: the 1-layer set first (seed 0 of every
# arm before any seed 1), then the 3-layer runs in the order the study needs them.
GUO_ARMS = ["softmax", "vga", "vga_x", "vga_out", "iga"]
GUO3_ARMS = ["softmax", "vga_out", "vga", "vga_x"]
assert set(GUO_ARMS + GUO3_ARMS) <= set(ATTENTION_ARMS), "GUO_ARMS names an arm the registry lacks"


def checkpoint_name(preset: str, arm: str, seed: int) -> str:
    return f"{preset}-{arm.replace('_', '-')}" + (f"-s{seed}" if seed else "")


def queue(which: str) -> list[tuple[str, str, int]]:
    runs = []
    if which in ("bb", "all"):
        runs += [("bb", arm, seed) for seed in (0, 1, 2) for arm in BB_ARMS]
    if which in ("guo", "all"):
        runs += [("bb-guo-cpu", arm, seed) for seed in (0, 1) for arm in GUO_ARMS]
        runs += [("bb3-guo-cpu", arm, 0) for arm in GUO3_ARMS]
    if which in ("tiny", "all"):
        runs += [("tiny", arm, seed) for seed in (0, 1) for arm in TINY_ARMS]
    return runs


def done(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and not (folder / "train_state.pt").exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue", default="bb", choices=["bb", "guo", "tiny", "all"])
    parser.add_argument("--worker", default="0/1", help="i/n: this process takes every n-th run from the i-th")
    parser.add_argument("--models", default="models")
    parser.add_argument("--retrain-seed0", action="store_true",
                        help="also rerun finished seed-0 checkpoints that lack a mechanism log (bb)")
    args = parser.parse_args()
    index, count = (int(x) for x in args.worker.split("/"))
    from qbench.train import train
    from qbench.train.logs import MECHANISM_FILE

    pending = []
    for preset, arm, seed in queue(args.queue):
        out = Path(args.models) / checkpoint_name(preset, arm, seed)
        stale = preset == "bb" and args.retrain_seed0 and not (out / MECHANISM_FILE).exists()
        if done(out) and not stale:
            print(f"[skip] {out} is complete", flush=True)
            continue
        pending.append((preset, arm, seed, out))
    # the runs still to do are dealt round-robin, so n workers share the work evenly
    for preset, arm, seed, out in pending[index::count]:
        print(f"[train] {preset} {arm} seed {seed} -> {out}", flush=True)
        train(arm, preset, seed, out, threads=1, progress=False)


if __name__ == "__main__":
    main()
