"""Stress, in two parts.

1. 4 concurrent `qbench bench` processes and a `qbench sweep --workers 2` on one store and
   one FP-reference cache, with SIGKILL / SIGINT at random moments (each killed process is
   started again), then a final clean pass.
2. One `qbench sweep --workers 2` and its faults: one worker SIGKILLed mid-cell, the
   weights of one model (a copy) corrupted while its cells are queued, poisoned records
   (a list where a metric belongs, a symlink to /dev/zero, a 100,000-deep array) planted
   in the store while it runs; then the weights are restored and the sweep run again.
3. Issue 33's attacks (bench/stress_cases.py), one command each against a store holding
   records: files that are not regular (a FIFO, /dev/zero), forged or oversized inputs,
   sizes over their bounds, a partial training state, malformed suites and zoo.yaml; each
   must end with its documented exit code within 60 s, in one line, nothing lost.

Each prints cells asked, cells recorded, records valid, duplicates computed (a cell
recorded by more than one finished computation) and crashes (an exit that was neither a
documented code nor caused by our own signal, or a traceback).  Not a unit test:
`python bench/stress.py [--kills 8] [--seed 0]`."""
from __future__ import annotations

import argparse
import os
import json
import random
import shutil
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
    parser.add_argument("--sweep-schemes", type=int, default=4, help="part 2: the first N schemes")
    parser.add_argument("--write", default=None, help="results/PERF.md: put the result in its Robustness section")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="qbench-stress-"))
    store, log = work / "store", work / "computed.log"
    # the test hooks (tests/hooks/sitecustomize.py) in every qbench process started here: the compute log
    hooks = [str(ROOT / "tests" / "hooks")]
    env = {**os.environ, "QBENCH_CACHE": str(work / "cache"), "QBENCH_TEST_COMPUTE_LOG": str(log), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(hooks + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    suite = work / "suite.yaml"
    models, schemes = args.models.split(","), args.schemes.split(",")
    suite.write_text(f"models: {models}\nschemes: {schemes}\nlimit: {args.limit}\n")
    bench = [sys.executable, "-m", "qbench.cli", "bench", "--model", args.models, "--limit", str(args.limit),
             "--results", str(store), "--quiet"]
    commands = {f"bench{i}": bench + ["--schemes", ",".join(rng.sample(schemes, len(schemes)))] for i in range(4)}
    commands["sweep"] = [sys.executable, "-m", "qbench.cli", "sweep", str(suite), "--workers", "2",
                         "--results", str(store), "--quiet"]
    logs = {name: open(work / f"{name}.err", "w") for name in commands}

    names: dict[int, str] = {}

    def start(name):
        proc = subprocess.Popen(commands[name], env=env, stdout=subprocess.DEVNULL, stderr=logs[name],
                                start_new_session=True)
        names[proc.pid] = name
        return proc

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
    crash_lines = [f"crash: {names.get(p.pid)} exit {p.returncode}"  # what each was, for the reader
                   + (f" after our {signal.Signals(signalled[p.pid]).name}" if p.pid in signalled else
                      " (not signalled)") for p in crashes]
    setup = (f"{len(commands)} concurrent commands (4 `qbench bench`, 1 `qbench sweep --workers 2`) on one store "
             f"and one FP-reference cache, {len(models)} models x {len(schemes)} schemes, {args.limit} characters; "
             f"{sum(killed.values())} kills at random moments ({dict(killed)}), each killed command started again; "
             f"then one clean pass; {time.time() - began:.0f} s")
    result = (f"| cells asked | cells recorded | records valid | duplicates computed | crashes | final pass |\n"
              f"|---:|---:|---:|---:|---:|---|\n| {asked} | {len(files)} | {valid} | {duplicates} | {len(crashes)} "
              f"(tracebacks in logs: {tracebacks}) | exit {final.returncode} |"
              + "".join(f"\n\n{line}" for line in crash_lines))
    print(f"stress: {setup} (work dir {work})")
    print(result)
    faults_setup, faults_result, faults_ok = sweep_faults(args, work, env, models, schemes[:args.sweep_schemes])
    print(f"sweep faults: {faults_setup}")
    print(faults_result)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stress_cases import TIMEOUT, run_cases

    cases_began = time.time()
    cases_table, cases_ok = run_cases(work, env, models[0])
    cases_setup = (f"issue 33's attacks (bench/stress_cases.py), one command each, against a store holding "
                   f"records; each must end with its documented exit code within {TIMEOUT} s, in one error line; "
                   f"{time.time() - cases_began:.0f} s")
    print(f"cases: {cases_setup}")
    print(cases_table)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from perf_quant import cpu_name
        from sections import replace_section

        vnni = " with AVX-512 VNNI" if "avx512_vnni" in Path("/proc/cpuinfo").read_text() else ""

        replace_section(Path(args.write), "Robustness",
                        f"`python bench/stress.py --kills {args.kills} --seed {args.seed} --write {args.write}` "
                        f"(CPU: {cpu_name()}{vnni}, {os.cpu_count()} cores shared with other jobs, OMP_NUM_THREADS=1, one torch "
                        f"thread per process).\n\n1. {setup}.\n\n{result}\n\n2. {faults_setup}.\n\n{faults_result}"
                        f"\n\n3. {cases_setup}.\n\n{cases_table}")
    return 0 if (len(files) == valid == asked and not crashes and final.returncode == 0 and faults_ok
                 and cases_ok) else 1


def _flip(path: Path) -> None:
    """XOR 0xFF over 4 KB just past the safetensors header (the issue's corruption)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:start + 4096] = bytes(b ^ 0xFF for b in data[start:start + 4096])
    path.write_bytes(bytes(data))


def sweep_faults(args, work: Path, env: dict, models: list[str], schemes: list[str]):
    """Part 2: one sweep, one worker killed, weights corrupted mid-queue, poisoned records
    planted while it runs; then weights restored and the sweep run again."""
    from qbench.paths import models_dir
    from qbench.results import ResultStore, cell_key
    from qbench.zoo import read_zoo

    store_dir, pids, log = work / "faults-store", work / "faults-pids", work / "faults-computed.log"
    pids.mkdir()
    copy = work / f"copy-of-{models[0]}"
    shutil.copytree(models_dir() / read_zoo()[models[0]]["path"], copy)
    original = (copy / "model.safetensors").read_bytes()
    suite = work / "faults.yaml"
    all_models = models + [str(copy)]
    suite.write_text(f"models: {all_models}\nschemes: {schemes}\nlimit: {args.limit}\n")
    env = {**env, "QBENCH_TEST_PID_DIR": str(pids), "QBENCH_TEST_CELL_DELAY": "1", "QBENCH_TEST_COMPUTE_LOG": str(log)}
    sweep = [sys.executable, "-m", "qbench.cli", "sweep", str(suite), "--workers", "2", "--results", str(store_dir),
             "--quiet"]
    began = time.time()
    err_log = open(work / "faults-sweep.err", "w")
    proc = subprocess.Popen(sweep, env=env, stdout=subprocess.PIPE, stderr=err_log, text=True, start_new_session=True)

    def wait_for(predicate, timeout=600.0):
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if found := predicate():
                return found
            time.sleep(0.1)
        return None

    killed = 0
    first = wait_for(lambda: sorted(pids.iterdir()))
    if first:
        os.kill(int(first[0].name.rsplit("-", 1)[1]), signal.SIGKILL)  # one worker, mid-cell
        killed += 1
    _flip(copy / "model.safetensors")  # the copy's cells are still queued (it is the last model)
    records = store_dir / "records"
    done = wait_for(lambda: [p for p in records.glob("*.json") if not p.is_symlink()] if records.is_dir() else [])
    planted, poisoned_key = 0, None
    if done:
        poisoned_key = done[0].stem
        record = json.loads(done[0].read_text())
        record["metrics"]["kl"] = [1, 2]  # key kept: only the schema can refuse it
        done[0].write_text(json.dumps(record))
        (records / f"{cell_key({'zero': 1})}.json").symlink_to("/dev/zero")
        deep = {"config": {"deep": 1}}
        (records / f"{cell_key(deep['config'])}.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
        planted = 3
    out, _ = proc.communicate(timeout=3600)
    first_exit = proc.returncode
    (copy / "model.safetensors").write_bytes(original)  # the user restores the weights and runs it again
    again = subprocess.run(sweep, env=env, capture_output=True, text=True)
    report = subprocess.run([sys.executable, "-m", "qbench.cli", "report", "--results", str(store_dir)], env=env,
                            capture_output=True, text=True)
    err_log.close()
    store = ResultStore(store_dir)
    asked = len(all_models) * len(schemes)
    files = [p for p in sorted(records.glob("*.json"))]
    valid = [r for r in store.records()]
    computed = Counter(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else Counter()
    computed[poisoned_key] -= 1  # its poisoned record was quarantined: computing it again is the point
    duplicates = sum(n - 1 for n in computed.values() if n > 1)
    logs = (work / "faults-sweep.err").read_text() + again.stderr + report.stderr
    crashes = sum(code not in (0, 1, 3) for code in (first_exit, again.returncode, report.returncode))
    crashes += logs.count("Traceback")
    failed = sum(r["status"] != "ok" for r in valid)
    setup = (f"`qbench sweep --workers 2`, {len(all_models)} models (one a copy of {models[0]}) x {len(schemes)} "
             f"schemes, {args.limit} characters: {killed} worker SIGKILLed mid-cell, the copy's weights corrupted "
             f"(4 KB XOR) while its cells were queued, {planted} poisoned records planted while it ran; first run "
             f"exit {first_exit} (3: the corrupted model's cells not run, every other cell recorded); weights "
             f"restored, second run exit {again.returncode}, then `qbench report` exit {report.returncode}; "
             f"{time.time() - began:.0f} s")
    # readers never move a file: only a writer about to compute a cell quarantines its invalid
    # file, so the planted files whose keys are no cell of the suite stay, skipped with a warning
    corrupt = store.corrupt()
    result = (f"| cells asked | record files | records valid | invalid files left (planted, keys of no cell) | "
              f"failed | duplicates computed (besides the poisoned cell's one recomputation) | crashes | "
              f"quarantined | lost |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
              f"| {asked} | {len(files)} | {len(valid)} | {len(corrupt)} | {failed} | {duplicates} | {crashes} | "
              f"{len(store.quarantined())} | {asked - len(valid)} |")
    ok = (len(valid) == asked and len(files) == asked + len(corrupt) and len(corrupt) <= planted - 1
          and not crashes and not duplicates and again.returncode == 0)
    return setup, result, ok


if __name__ == "__main__":
    sys.exit(main())
