"""Stress: 4 concurrent `qbench bench` processes and a `qbench sweep --workers 2` on one
store and one FP-reference cache, with SIGKILL / SIGINT at random moments (each killed
process is started again), then a final clean pass.  Prints cells asked, cells recorded,
records valid, duplicates computed (a cell recorded by more than one finished
computation) and crashes (an exit that was neither 0 nor caused by our own signal, or a
traceback).  Not a unit test: `python bench/stress.py [--kills 8] [--seed 0]`."""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny-vga,tiny-softmax,tiny-iga")
    parser.add_argument("--schemes", default="fp32,w8a8-dyn,w4-rtn-g64,w8a8-pt,w6a6,nf4,w4a8,llm-int8")
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--write", default=None, help="results/PERF.md: put the result in its Robustness section")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="qbench-stress-"))
    store, log = work / "store", work / "computed.log"
    env = {**os.environ, "QBENCH_CACHE": str(work / "cache"), "QBENCH_COMPUTE_LOG": str(log), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    suite = work / "suite.yaml"
    models, schemes = args.models.split(","), args.schemes.split(",")
    suite.write_text(f"models: {models}\nschemes: {schemes}\nlimit: {args.limit}\n")
    bench = [sys.executable, "-m", "qbench.cli", "bench", "--model", args.models, "--limit", str(args.limit),
             "--results", str(store), "--quiet"]
    commands = {f"bench{i}": bench + ["--schemes", ",".join(rng.sample(schemes, len(schemes)))] for i in range(4)}
    commands["sweep"] = [sys.executable, "-m", "qbench.cli", "sweep", str(suite), "--workers", "2",
                         "--results", str(store), "--quiet"]
    logs = {name: open(work / f"{name}.err", "w") for name in commands}

    def start(name):
        return subprocess.Popen(commands[name], env=env, stdout=subprocess.DEVNULL, stderr=logs[name],
                                start_new_session=True)

    procs = {name: start(name) for name in commands}
    killed, exits, began = Counter(), [], time.time()
    signalled: dict[int, int] = {}
    kills_left = args.kills
    while time.time() - began < args.timeout:
        for name, proc in list(procs.items()):
            if proc.poll() is not None and proc.pid not in [p.pid for p in exits]:
                exits.append(proc)
        running = [n for n, p in procs.items() if p.poll() is None]
        if not running:
            break
        if kills_left > 0:
            time.sleep(rng.uniform(1, 6))
            name = rng.choice([n for n, p in procs.items() if p.poll() is None] or list(procs))
            proc = procs[name]
            if proc.poll() is None:
                sig = rng.choice([signal.SIGKILL, signal.SIGINT])
                os.killpg(proc.pid, sig)
                signalled[proc.pid] = sig
                killed[signal.Signals(sig).name] += 1
                proc.wait()
                exits.append(proc)
            kills_left -= 1
            procs[name] = start(name)  # the user runs the command again
        else:
            time.sleep(1)
    for proc in procs.values():
        proc.wait()
        if proc not in exits:
            exits.append(proc)
    final = subprocess.run(bench + ["--schemes", args.schemes], env=env, capture_output=True, text=True)
    for f in logs.values():
        f.close()

    from qbench.results import ResultStore, validate_record

    asked = len(models) * len(schemes)
    files = sorted((store / "records").glob("*.json"))
    records = ResultStore(store).records()
    valid = sum(1 for r in records if validate_record(r, r["key"]) is None)
    computed = Counter(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else Counter()
    duplicates = sum(n - 1 for n in computed.values() if n > 1)
    ours = {signal.SIGINT: (130, -signal.SIGINT), signal.SIGKILL: (-signal.SIGKILL,)}
    crashes = [p for p in exits if p.returncode != 0 and p.returncode not in ours.get(signalled.get(p.pid), ())]
    tracebacks = sum("Traceback" in (work / f"{n}.err").read_text() for n in commands)
    setup = (f"{len(commands)} concurrent commands (4 `qbench bench`, 1 `qbench sweep --workers 2`) on one store "
             f"and one FP-reference cache, {len(models)} models x {len(schemes)} schemes, {args.limit} characters; "
             f"{sum(killed.values())} kills at random moments ({dict(killed)}), each killed command started again; "
             f"then one clean pass; {time.time() - began:.0f} s")
    result = (f"| cells asked | cells recorded | records valid | duplicates computed | crashes | final pass |\n"
              f"|---:|---:|---:|---:|---:|---|\n| {asked} | {len(files)} | {valid} | {duplicates} | {len(crashes)} "
              f"(tracebacks in logs: {tracebacks}) | exit {final.returncode} |")
    print(f"stress: {setup} (work dir {work})")
    print(result)
    if args.write:
        from perf_quant import cpu_name

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sections import replace_section

        replace_section(Path(args.write), "Robustness",
                        f"`python bench/stress.py --kills {args.kills} --seed {args.seed} --write {args.write}` "
                        f"(CPU: {cpu_name()}, 2 cores, other jobs running): {setup}.\n\n{result}")
    return 0 if (len(files) == valid == asked and not crashes and final.returncode == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
