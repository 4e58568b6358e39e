"""Train the GPU part of the zoo on one CUDA device inside a wall-clock budget, and hand the
checkpoints back in batches that fit a transfer limit (8 files, 64 MiB per batch).

On the GPU machine:
    python scripts/gpu_zoo.py train --work /tmp/gpu_zoo --out $OUT --budget 450
    python scripts/gpu_zoo.py fetch --work /tmp/gpu_zoo --out $OUT    # the next batch
Back here:
    python scripts/gpu_zoo.py unpack FOLDER_WITH_TARS --models models

What `train` runs, side by side:
  1. this process: the `small` preset for every arm, seed 0, one arm after another (bf16
     autocast, float32 master weights, weights stored bf16).  The step count is set from a
     timing probe (25 steps of softmax and of clipped, the slowest arm) so that all six arms
     fit the budget; it is recorded in each checkpoint's recipe.
  2. a child process: the `tiny` checkpoints the zoo lacks, with the tiny recipe unchanged
     (float32 on the GPU, TF32 off); weights stored bf16 so that three batches carry them.
Every finished checkpoint is packed at once into WORK/ret/<priority>-<name>.tar; a run that
is not finished when the budget ends is stopped and reported, never packed.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_queue import checkpoint_name, done, queue  # noqa: E402

from qbench.modeling.attention import ATTENTION_ARMS  # noqa: E402
from qbench.archive import safe_extract  # noqa: E402

# every registered arm; runs whose checkpoint is already in models/ are not trained again
SMALL_ARMS = list(ATTENTION_ARMS)
MODELS = Path(__file__).resolve().parent.parent / "models"
TINY_RUNS = [(arm, seed) for _, arm, seed in queue("tiny") if not done(MODELS / checkpoint_name("tiny", arm, seed))]
BATCH_FILES, BATCH_BYTES = 7, 63 * 2**20  # one file of the 8 is left for the log
PROBE_STEPS, RESERVE_S = 25, 45


def log(work: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(work / "gpu_zoo.log", "a") as f:
        f.write(line + "\n")


def pack(work: Path, folder: Path, priority: int) -> Path:
    ret = work / "ret"
    ret.mkdir(exist_ok=True)
    target = ret / f"{priority:02d}-{folder.name}.tar"
    tmp = target.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        tar.add(folder, arcname=folder.name, filter=lambda t: None if t.name.endswith("train_state.pt") else t)
    tmp.replace(target)
    return target


def seconds_per_step(folder: Path) -> float:
    rows = list(csv.DictReader(open(folder / "train_log.csv")))
    first, last = rows[4], rows[-1]
    return (float(last["seconds"]) - float(first["seconds"])) / (int(last["step"]) - int(first["step"]))


def cmd_tiny(args) -> int:
    import torch

    from qbench.train import train

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(args.work)
    for n, (arm, seed) in enumerate(TINY_RUNS):
        name = checkpoint_name("tiny", arm, seed)
        try:
            t = time.time()
            info = train(arm, "tiny", seed, work / "ckpt" / name, device=args.device, save_dtype="bfloat16",
                         steps=args.steps_cap, progress=False)
            pack(work, work / "ckpt" / name, 10 + n)
            log(work, f"tiny {name}: val ppl {info['final_val_ppl']:.2f} in {time.time() - t:.0f} s")
        except Exception:  # noqa: BLE001  one failed run must not cost the others
            log(work, f"tiny {name} FAILED:\n{traceback.format_exc()}")
    return 0


def cmd_train(args) -> int:
    import torch

    from qbench.train import train

    start = time.time()
    deadline = start + args.budget
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu"
    log(work, f"torch {torch.__version__}, {where}, budget {args.budget} s")
    amp = "bf16" if args.device != "cpu" else None  # CPU bf16 autocast is slow without native bf16
    cap = ["--steps-cap", str(args.steps_cap)] if args.steps_cap else []
    child = subprocess.Popen([sys.executable, __file__, "tiny", "--work", str(work), "--device", args.device] + cap)

    try:
        per_step = {}
        for arm in ("softmax", "clipped"):
            folder = work / "probe" / arm
            train(arm, "small", 0, folder, steps=PROBE_STEPS, device=args.device, amp=amp, progress=False)
            per_step[arm] = seconds_per_step(folder)
        round_s = per_step["clipped"] + 5 * 1.1 * per_step["softmax"]
        left = deadline - time.time() - RESERVE_S
        steps = int(max(250, min(3000, left / round_s // 250 * 250)))
        log(work, f"probe: {per_step} s/step -> {steps} steps per small arm ({left:.0f} s left)")
    except Exception:  # noqa: BLE001
        steps = 1000
        log(work, f"timing probe FAILED, {steps} steps per small arm:\n{traceback.format_exc()}")
    steps = min(steps, args.steps_cap or steps)

    for n, arm in enumerate(SMALL_ARMS):
        name = checkpoint_name("small", arm, 0)
        if time.time() > deadline - 15:
            log(work, f"small {name}: skipped, budget spent")
            continue
        try:
            t = time.time()
            info = train(arm, "small", 0, work / "ckpt" / name, steps=steps, device=args.device, amp=amp,
                         save_dtype="bfloat16", progress=False)
            pack(work, work / "ckpt" / name, n)
            log(work, f"small {name}: {steps} steps, val ppl {info['final_val_ppl']:.2f} in {time.time() - t:.0f} s")
        except Exception:  # noqa: BLE001
            log(work, f"small {name} FAILED:\n{traceback.format_exc()}")

    try:
        child.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        child.kill()
        log(work, "tiny queue stopped at the budget's end; unfinished runs are not packed")
    log(work, f"done in {time.time() - start:.0f} s; packed: {sorted(p.name for p in (work / 'ret').glob('*.tar'))}")
    return cmd_fetch(args)


def cmd_fetch(args) -> int:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    taken, size = [], 0
    for tar in sorted((work / "ret").glob("*.tar")):
        if len(taken) == BATCH_FILES or size + tar.stat().st_size > BATCH_BYTES:
            break
        size += tar.stat().st_size
        shutil.move(str(tar), out / tar.name)
        taken.append(tar.name)
    left = sorted(p.name for p in (work / "ret").glob("*.tar"))
    log(work, f"batch: {taken} ({size / 2**20:.1f} MiB); still on the machine: {left}")
    for name in ("gpu_zoo.log", "campaign.log"):  # whichever script ran
        if (work / name).exists():
            (out / name).write_text((work / name).read_text())
    return 0


def cmd_unpack(args) -> int:
    models = Path(args.models)
    for tar in sorted(Path(args.folder).glob("*.tar")):
        if tar.name.endswith(".records.tar"):  # result records, not a checkpoint
            print(f"[records] {tar.name}: tar -xf {tar} -C results")
            continue
        if tar.name.endswith(".partial.tar"):  # an unfinished run: it resumes on the next GPU budget
            print(f"[partial] {tar.name}: resume it with scripts/device_bundle.py build bb-campaign --resume "
                  f"{args.folder}")
            continue
        with tarfile.open(tar) as t:
            name = t.getnames()[0].split("/")[0]
            if (models / name / "model.safetensors").exists():
                print(f"[keep] {models / name} exists; {tar.name} not unpacked")
                continue
            safe_extract(t, models)
            print(f"[new] {models / name}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, required=True, help="seconds for all training")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps-cap", type=int, default=None, help="at most this many steps per run (smoke tests)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("tiny")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps-cap", type=int, default=None)
    p.set_defaults(func=cmd_tiny)
    p = sub.add_parser("fetch")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("unpack")
    p.add_argument("folder")
    p.add_argument("--models", default="models")
    p.set_defaults(func=cmd_unpack)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
