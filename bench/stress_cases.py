"""Part 3 of bench/stress.py: issue 33's attacks, one command each, against a store that
already holds records.  Each must end with its documented exit code within 60 s, in one
error line (no traceback), and leave the store's records as they were (nothing lost).

    python bench/stress_cases.py      # alone: prints the table
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QB = [sys.executable, "-m", "qbench.cli"]
TIMEOUT = 60


def _copy_model(work: Path, name: str, model: str) -> Path:
    from qbench.paths import models_dir
    from qbench.zoo import read_zoo

    folder = work / name
    shutil.copytree(models_dir() / read_zoo()[model]["path"], folder)
    return folder


def _suite(work: Path, name: str, text: str) -> str:
    path = work / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def cases(work: Path, model: str, store: Path) -> list[tuple[str, list[str], int, dict]]:
    """(what, command, documented exit code, extra environment); files are planted here."""
    bench = QB + ["bench", "--schemes", "fp32", "--limit", "2000", "--results", str(store), "--quiet", "--model"]
    fifo = _copy_model(work, "fifo-weights", model)
    (fifo / "model.safetensors").unlink()
    os.mkfifo(fifo / "model.safetensors")
    zero = _copy_model(work, "devzero-bin", model)
    (zero / "model.safetensors").unlink()
    (zero / "pytorch_model.bin").symlink_to("/dev/zero")
    rf = {}
    good = {"base": model, "base_checkpoint_hash": "0" * 16, "arm": "vga", "seed": 0, "recipe": {"name": "r"},
            "trainable": []}
    for name, text in (("deep", "[" * 100_000 + "]" * 100_000), ("wrong-type", json.dumps({**good, "recipe": "x"})),
                       ("2-MB", json.dumps({**good, "pad": "x" * (2 << 20)}))):
        rf[name] = work / f"retrofit-{name}"
        rf[name].mkdir()
        (rf[name] / "retrofit.json").write_text(text)
        (rf[name] / "deltas.safetensors").write_bytes(b"")
    partial = work / "retrofit-partial"
    partial.mkdir()
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(partial / "retrofit_state.safetensors"))  # the step's file never landed
    zoo = work / "bad-zoo"
    zoo.mkdir()
    (zoo / "zoo.yaml").write_text("models: [a, b]\n")
    million = "models: [" + ", ".join(f"m{i}" for i in range(1000)) + "]\nschemes: [" + \
        ", ".join(["fp32"] * 1) + "]\ncalibration_seeds: [" + ", ".join(map(str, range(1000))) + "]\n"
    return [
        ("model.safetensors a FIFO", bench + [str(fifo)], 3, {}),
        ("pytorch_model.bin a symlink to /dev/zero", bench + [str(zero)], 3, {}),
        ("retrofit.json 100,000 levels deep", bench + [str(rf["deep"])], 3, {}),
        ("retrofit.json recipe of the wrong type", bench + [str(rf["wrong-type"])], 3, {}),
        ("retrofit.json of 2 MB", bench + [str(rf["2-MB"])], 3, {}),
        ("retrofit state without its step (killed between two renames, old format)",
         QB + ["retrofit", "--arm", "vga", "--out", str(partial), "--quiet"], 3, {}),
        ("a suite of 10^6 cells", QB + ["sweep", _suite(work, "million", million), "--results", str(store)], 2, {}),
        ("resources num_cpus 10^6", QB + ["sweep", _suite(work, "cpus", f"models: [{model}]\nschemes: [fp32]\n"
                                                          "resources: {num_cpus: 1000000}\n"), "--results", str(store)],
         2, {}),
        ("suite corpus: [a, b]", QB + ["sweep", _suite(work, "corpus-list", f"models: [{model}]\nschemes: [fp32]\n"
                                                       "corpus: [a, b]\n"), "--results", str(store)], 2, {}),
        ("suite resources: [1, 2]", QB + ["sweep", _suite(work, "res-list", f"models: [{model}]\nschemes: [fp32]\n"
                                                          "resources: [1, 2]\n"), "--results", str(store)], 2, {}),
        ("train --set d_model=1000000", QB + ["train", "--attention", "vga", "--set", "d_model=1000000",
                                              "--out", str(work / "t1"), "--quiet"], 2, {}),
        ("train --set n_layer=100000", QB + ["train", "--attention", "vga", "--set", "n_layer=100000",
                                             "--out", str(work / "t2"), "--quiet"], 2, {}),
        ("train --threads 1000000", QB + ["train", "--attention", "vga", "--threads", "1000000",
                                          "--out", str(work / "t3"), "--quiet"], 2, {}),
        ("malformed zoo.yaml under QBENCH_MODELS", QB + ["list", "models"], 3, {"QBENCH_MODELS": str(zoo)}),
        ("bench --first-token not a token", bench + [model, "--first-token", "<nope>"], 2, {}),
        ("lm_eval --model qbench --model_args model=does-not-exist",
         [sys.executable, "-m", "lm_eval", "--model", "qbench", "--model_args", "model=does-not-exist",
          "--tasks", "qbench_cloze"], 2, {}),
    ]


def run_cases(work: Path, env: dict, model: str = "tiny-vga") -> tuple[str, bool]:
    """Runs every case; returns a markdown table and whether all held."""
    from qbench.results import ResultStore

    store = work / "cases-store"
    subprocess.run(QB + ["bench", "--model", model, "--schemes", "fp32,w8a8-dyn", "--limit", "2000",
                         "--results", str(store), "--quiet"], env=env, capture_output=True, timeout=600)
    before = {p.name: p.read_bytes() for p in (store / "records").glob("*.json")}
    rows, ok = [], bool(before)
    for what, command, expected, extra in cases(work, model, store):
        began = time.time()
        try:
            done = subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=TIMEOUT)
            code, err = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            code, err = "timeout", ""
        seconds = time.time() - began
        lines = [line for line in err.splitlines() if line.startswith(("qbench", "lm_eval --model qbench"))]
        held = code == expected and len(lines) == 1 and "Traceback" not in err and seconds < TIMEOUT
        ok &= held
        rows.append(f"| {what} | {expected} | {code} | {seconds:.0f} | {len(lines)} | "
                    f"{'Traceback' in err} | {'yes' if held else 'NO'} |")
    after = {p.name: p.read_bytes() for p in (store / "records").glob("*.json")}
    lost = sum(1 for name, data in before.items() if after.get(name) != data)
    ok &= lost == 0 and not ResultStore(store).quarantined()
    table = ("| case | documented exit | exit | seconds | error lines | traceback | held |\n"
             "|---|---:|---:|---:|---:|---|---|\n" + "\n".join(rows)
             + f"\n\nThe store's {len(before)} records before the cases: {lost} changed or lost.")
    return table, ok


if __name__ == "__main__":
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="qbench-cases-"))
    env = {**os.environ, "QBENCH_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    table, ok = run_cases(work, env)
    print(table)
    sys.exit(0 if ok else 1)
