"""The Bigram-Backcopy campaign for a lent GPU, sized to one device budget (15 minutes of
machine time, commands of at most 10): `bb-guo` (Guo et al.'s 1-layer recipe, 10,000 steps)
for softmax, vga, vga_x, vga_out and iga at seed 0 first, then the other arms, `bb3-guo`,
and seed 1, several runs side by side, as far as the budget goes.

On the GPU machine, through scripts/device_bundle.py (`build bb-campaign`; its run.sh):
    python scripts/gpu_campaign.py run --work /tmp/campaign --out $OUT --budget 540 --resume resume
    python scripts/gpu_campaign.py fetch --work /tmp/campaign --out $OUT     # a further batch
Back here:
    python scripts/gpu_zoo.py unpack FOLDER_WITH_TARS --models models && qbench zoo
On the CPU, the whole pipeline with a handful of steps (CI runs this; `run` is the default
command, and a dry run without --work/--out uses a fresh temporary folder for each):
    python scripts/gpu_campaign.py --dry-run

Precision: bf16 autocast with float32 master weights (`--precision bf16`, the default; the
checkpoint's card and config record `amp: bf16`), or `--precision fp32` (TF32 off, the
recipe as written).  The dry run uses the same autocast path on the CPU.

Budget: a run starts only if the time left covers the longest run of its preset measured
so far.  At the deadline unfinished runs are stopped, and each one's last saved state
(every `save_every` steps) is handed back as `<priority>-<name>.partial.tar` holding
`train_state.safetensors` (no pickle) and its logs; the next budget's bundle carries those
tars (`device_bundle.py build bb-campaign --resume FOLDER`) and `--resume` puts them back,
so `qbench train` continues where the state stopped, bit-for-bit.  Finished checkpoints
are packed as `<priority>-<name>.tar` (weights bf16, with train and mechanism logs), and
their BB cells (`--cells`, measured on the device as each run finishes) as
00-bb-cells.records.tar (here: `tar -xf it -C results`).  Batches go back within the tool's
limits (7 tars and 63 MiB a call); the log (campaign.log) records every start, finish,
step rate and stop.

Sizing (estimates, not measured: no GPU was lent when this was written).  REFERENCE.md
section 7 measured 8.3 steps/s per run for 16 bb-guo runs side by side at float32 on an
H200; on the CPU here the old per-position multinomial sampler alone took 225 ms per
batch of 512 x 64 and the inverse-CDF sampler the GPU presets now use 10 ms, so that rate
was most likely the sampler's.  If a run then goes at 25-40 steps/s, five runs take 4-7
minutes; if not, the deadline stops them and the next budget resumes them.
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
from qbench.archive import safe_extract  # noqa: E402

# The study's arms: the five of the issue first (the VGA forms, their contrasts, IGA), then
# the new normalisers.
FIRST_ARMS = ("softmax", "vga", "vga_x", "vga_out", "iga")
ARMS = [a for a in FIRST_ARMS + ("softpick", "sigmoid", "sink_logit") if a in ATTENTION_ARMS]
PRESETS = ("bb-guo", "bb3-guo")
DRY_RUN_SETTINGS = ["steps=2", "batch_size=4", "save_every=2", "eval_every=2"]
# the BB cells measured on the device for each finished checkpoint (the BB protocol: copy and
# bigram positions, Attn_s / Val_s / Delta-logit_s per layer); a dry run measures fp32 only
CELL_SCHEMES = "fp32,w8a8-dyn,w8a8-pt,w6a6"
CELLS_TAR = "00-bb-cells.records.tar"


def queue(seeds=(0, 1)) -> list[tuple[str, str, int]]:
    """bb-guo x the first five arms at the first seed, then everything else in order."""
    order = [(preset, arm, seed) for seed in seeds for preset in PRESETS for arm in ARMS]
    first = [run for run in order if run[0] == PRESETS[0] and run[1] in FIRST_ARMS and run[2] == seeds[0]]
    return first + [run for run in order if run not in first]


def restore(work: Path, folder: str | None) -> list[str]:
    """Unpack `<priority>-<name>.partial.tar` files from `folder` into WORK/ckpt (their
    train_state.safetensors resumes the run); returns the names."""
    import tarfile

    names = []
    for tar in sorted(Path(folder).glob("*.partial.tar")) if folder and Path(folder).is_dir() else []:
        with tarfile.open(tar) as t:
            name = t.getnames()[0].split("/")[0]
            safe_extract(t, work / "ckpt")
        names.append(name)
    return names


def pack_partial(work: Path, folder: Path, priority: int) -> Path | None:
    """A stopped run's last saved state as safetensors, with its logs, for the next budget."""
    import tarfile

    from qbench.train.state import STATE_FILE, TRAVEL_FILE, load_train_state, save_state

    if not (folder / STATE_FILE).exists():
        return None
    save_state(load_train_state(folder / STATE_FILE), folder / TRAVEL_FILE)
    (folder / STATE_FILE).unlink()
    target = work / "ret" / f"{priority:02d}-{folder.name}.partial.tar"
    target.parent.mkdir(exist_ok=True)
    with tarfile.open(target, "w") as tar:
        for path in sorted(folder.iterdir()):
            if path.name.endswith((".safetensors", ".csv", ".json")):
                tar.add(path, arcname=f"{folder.name}/{path.name}")
    return target


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
    if args.arms:
        unknown = set(args.arms.split(",")) - set(ARMS)
        if unknown:
            raise SystemExit(f"--arms: unknown {', '.join(sorted(unknown))} (campaign arms: {', '.join(ARMS)})")
        pending = [run for run in pending if run[1] in args.arms.split(",")]
    resumed = restore(work, args.resume)
    if resumed:  # runs handed back unfinished go first
        pending = sorted(pending, key=lambda run: checkpoint_name(*run) not in resumed)
        log(work, f"resuming {len(resumed)} run(s) from {args.resume}: {', '.join(resumed)}")
    device = "cpu" if args.dry_run else args.device
    extra = [x for s in DRY_RUN_SETTINGS for x in ("--set", s)] if args.dry_run else []
    if args.precision == "bf16":
        extra += ["--amp", "bf16"]
    running: dict[str, tuple[subprocess.Popen, float, str, int]] = {}
    longest: dict[str, float] = {}
    finished, stopped, failed = [], [], []
    # torch keeps TF32 off for matmuls by default: --precision fp32 trains in true float32
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cells = Cells(work, "fp32" if args.dry_run else args.cells, device, env)
    log(work, f"campaign: {len(pending)} runs, {args.parallel} at a time on {device}, {args.precision}, "
              f"budget {args.budget:.0f} s")
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
                log(work, f"done {name} in {seconds:.0f} s ({steps_per_second(work / 'ckpt' / name)}) -> "
                          f"{tar.name} ({tar.stat().st_size / 2**20:.1f} MiB)")
                cells.queue.append(name)
            else:
                failed.append(name)
                log(work, f"FAILED {name} (exit {proc.returncode}) after {seconds:.0f} s; see {name}.log")
        cells.step()
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
            for name, (proc, began, _, prio) in running.items():
                proc.kill()
                proc.wait()
                stopped.append(name)
                partial = pack_partial(work, work / "ckpt" / name, prio)
                log(work, f"stopped {name} at the deadline after {time.time() - began:.0f} s "
                          f"({steps_per_second(work / 'ckpt' / name)}); "
                          + (f"state handed back as {partial.name}" if partial else "no state saved yet"))
            running.clear()
            stopped += [checkpoint_name(*p) for p in pending]
            pending.clear()
        time.sleep(0.5)
    log(work, f"campaign finished in {time.time() - start:.0f} s: {len(finished)} packed, {len(failed)} failed, "
              f"{len(stopped)} not run or stopped; longest run per preset {longest}")
    cells.finish(deadline + 30)
    return cmd_fetch(argparse.Namespace(work=str(work), out=args.out))


class Cells:
    """The BB cells of each finished checkpoint, one `qbench bench` at a time beside the
    training runs; their records are packed into CELLS_TAR at the end."""

    def __init__(self, work: Path, schemes: str, device: str, env: dict):
        self.work, self.schemes, self.device, self.env = work, schemes, device, env
        self.queue: list[str] = []
        self.current: tuple[str, subprocess.Popen] | None = None

    def step(self) -> None:
        if self.current and self.current[1].poll() is not None:
            log(self.work, f"cells of {self.current[0]}: exit {self.current[1].returncode}")
            self.current = None
        if self.current is None and self.queue:
            name = self.queue.pop(0)
            command = [sys.executable, "-m", "qbench.cli", "bench", "--model", str(self.work / "ckpt" / name),
                       "--schemes", self.schemes, "--tasks", "ppl", "--results", str(self.work / "records"),
                       "--device", self.device, "--quiet"]
            logfile = open(self.work / f"{name}.bench.log", "w")
            self.current = (name, subprocess.Popen(command, env=self.env, stdout=logfile, stderr=subprocess.STDOUT))

    def finish(self, until: float) -> None:
        import tarfile

        while (self.current or self.queue) and time.time() < until:
            self.step()
            time.sleep(0.5)
        if self.current:
            self.current[1].kill()
            log(self.work, f"cells of {self.current[0]} stopped at the deadline; not measured: {self.queue}")
        records = sorted((self.work / "records").rglob("*.json")) if (self.work / "records").is_dir() else []
        if records:
            (self.work / "ret").mkdir(exist_ok=True)
            with tarfile.open(self.work / "ret" / CELLS_TAR, "w") as tar:
                for path in records:
                    tar.add(path, arcname=f"records/{path.name}")
            log(self.work, f"{len(records)} BB cell records -> {CELLS_TAR}")


def steps_per_second(folder: Path) -> str:
    """The run's measured rate from its log (the seconds column), for the campaign log."""
    import csv

    try:
        rows = list(csv.DictReader(open(folder / "train_log.csv")))
        first, last = rows[min(4, len(rows) - 1)], rows[-1]
        steps = int(last["step"]) - int(first["step"])
        return f"{steps / max(1e-9, float(last['seconds']) - float(first['seconds'])):.1f} steps/s, step {last['step']}"
    except (OSError, KeyError, ValueError, IndexError):
        return "no rate"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--work", default=None, help="working folder (required unless --dry-run)")
    p.add_argument("--out", default=None, help="folder handed back, e.g. $OUT (required unless --dry-run)")
    p.add_argument("--budget", type=float, default=690, help="seconds from the start to the last finished run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", type=int, default=8, help="runs at once (a 1-layer run uses a sliver of an H200)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16 autocast (float32 master weights; recorded in each checkpoint) or float32, TF32 off")
    p.add_argument("--cells", default=CELL_SCHEMES, help="schemes of the BB cells measured on each finished checkpoint")
    p.add_argument("--resume", default=None, help="folder of *.partial.tar handed back by an earlier budget")
    p.add_argument("--dry-run", action="store_true", help="CPU, seed 0 only, 2 steps of batch 4 per run")
    p.add_argument("--arms", default=None, help="only these arms (comma-separated; default: every campaign arm)")
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
