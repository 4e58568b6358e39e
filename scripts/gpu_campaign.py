"""The Bigram-Backcopy campaign for a lent GPU (one H200, about 12 minutes of training):
Guo et al.'s recipe (`bb-guo`, 1 layer; `bb3-guo`, 3 layers) for every arm of the study,
seed 0 first, then seed 1 as the budget allows, several runs side by side on the device.

On the GPU machine (one prepared call; `fetch` brings back the next batch if one is left):
    python scripts/gpu_campaign.py run --work /tmp/campaign --out $OUT --budget 690
    python scripts/gpu_campaign.py fetch --work /tmp/campaign --out $OUT
Back here:
    python scripts/gpu_zoo.py unpack FOLDER_WITH_TARS --models models && qbench zoo
On the CPU, the whole pipeline with a handful of steps (CI runs this; `run` is the default
command, and a dry run without --work/--out uses a fresh temporary folder for each):
    python scripts/gpu_campaign.py --dry-run

How it spends the budget: `--parallel` runs at once (each `qbench train` in its own process,
float32, TF32 off: the recipe, not a faster approximation of it); a run starts only if the
time left covers the longest run of its preset measured so far (before any has finished,
the first wave starts anyway); at the deadline unfinished runs are stopped and reported,
never packed.  Every finished checkpoint is packed at once (weights bf16: a 1-layer model
is about 2 MB) into WORK/ret/<priority>-<name>.tar, in queue order, and handed back in
batches within the device tool's limits (8 files, 64 MiB per call).  The log
(WORK/campaign.log, also copied into OUT) records every start, finish and timing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from gpu_zoo import cmd_fetch, pack  # noqa: E402
from train_queue import checkpoint_name  # noqa: E402

from qbench.modeling.attention import ATTENTION_ARMS  # noqa: E402

# The study's arms: the VGA forms and their contrasts, IGA, and the new normalisers.
ARMS = [a for a in ("softmax", "vga", "vga_x", "vga_out", "iga", "softpick", "sigmoid", "sink_logit")
        if a in ATTENTION_ARMS]
PRESETS = ("bb-guo", "bb3-guo")
DRY_RUN_SETTINGS = ["steps=2", "batch_size=4", "save_every=2", "eval_every=2"]


def queue(seeds=(0, 1)) -> list[tuple[str, str, int]]:
    return [(preset, arm, seed) for seed in seeds for preset in PRESETS for arm in ARMS]


def log(work: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(work / "campaign.log", "a") as f:
        f.write(line + "\n")


def cmd_run(args) -> int:
    work = Path(args.work)
    (work / "ckpt").mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.budget
    pending = queue((0,) if args.dry_run else (0, 1))
    device = "cpu" if args.dry_run else args.device
    extra = [x for s in DRY_RUN_SETTINGS for x in ("--set", s)] if args.dry_run else []
    running: dict[str, tuple[subprocess.Popen, float, str, int]] = {}
    longest: dict[str, float] = {}
    finished, stopped, failed = [], [], []
    # torch keeps TF32 off for matmuls by default: the runs train in true float32
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log(work, f"campaign: {len(pending)} runs, {args.parallel} at a time on {device}, budget {args.budget:.0f} s")
    priority = 0
    while pending or running:
        for name, (proc, began, preset, prio) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            seconds = time.time() - began
            if proc.returncode == 0:
                longest[preset] = max(longest.get(preset, 0.0), seconds)
                tar = pack(work, work / "ckpt" / name, prio)
                finished.append(name)
                log(work, f"done {name} in {seconds:.0f} s -> {tar.name} ({tar.stat().st_size / 2**20:.1f} MiB)")
            else:
                failed.append(name)
                log(work, f"FAILED {name} (exit {proc.returncode}) after {seconds:.0f} s; see {name}.log")
        left = deadline - time.time()
        while pending and len(running) < args.parallel:
            preset, arm, seed = pending[0]
            if preset in longest and longest[preset] * 1.05 > left:
                log(work, f"skip {checkpoint_name(preset, arm, seed)}: {left:.0f} s left, a {preset} run takes "
                          f"{longest[preset]:.0f} s")
                pending.pop(0)
                continue
            pending.pop(0)
            name = checkpoint_name(preset, arm, seed)
            command = [sys.executable, "-m", "qbench.cli", "train", "--preset", preset, "--attention", arm,
                       "--seed", str(seed), "--out", str(work / "ckpt" / name), "--device", device,
                       "--save-dtype", "bfloat16", "--threads", "1", "--quiet", *extra]
            logfile = open(work / f"{name}.log", "w")
            running[name] = (subprocess.Popen(command, env=env, stdout=logfile, stderr=subprocess.STDOUT),
                             time.time(), preset, priority)
            priority += 1
            log(work, f"start {name}")
        if time.time() > deadline:
            for name, (proc, began, _, _) in running.items():
                proc.kill()
                stopped.append(name)
                log(work, f"stopped {name} at the deadline after {time.time() - began:.0f} s (not packed)")
            running.clear()
            stopped += [checkpoint_name(*p) for p in pending]
            pending.clear()
        time.sleep(0.5)
    log(work, f"campaign finished in {time.time() - start:.0f} s: {len(finished)} packed, {len(failed)} failed, "
              f"{len(stopped)} not run or stopped; longest run per preset {longest}")
    return cmd_fetch(argparse.Namespace(work=str(work), out=args.out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--work", default=None, help="working folder (required unless --dry-run)")
    p.add_argument("--out", default=None, help="folder handed back, e.g. $OUT (required unless --dry-run)")
    p.add_argument("--budget", type=float, default=690, help="seconds from the start to the last finished run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", type=int, default=8, help="runs at once (a 1-layer run uses a sliver of an H200)")
    p.add_argument("--dry-run", action="store_true", help="CPU, seed 0 only, 2 steps of batch 4 per run")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("fetch")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=lambda a: cmd_fetch(a))
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("run", "fetch", "-h", "--help"):
        argv = ["run", *argv]  # `run` is the default command
    args = parser.parse_args(argv)
    if args.command == "run":
        for option in ("work", "out"):
            if getattr(args, option) is None:
                if not args.dry_run:
                    parser.error(f"run: --{option} is required (unless --dry-run)")
                setattr(args, option, tempfile.mkdtemp(prefix=f"qbench-campaign-{option}-"))
        if args.dry_run:
            args.parallel = min(args.parallel, 2)
            print(f"dry run: work {args.work}, out {args.out}", flush=True)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
