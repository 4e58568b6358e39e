"""The result store: one JSON record per cell (model x scheme x evaluation), named by the
hash of the cell's fully resolved configuration, written atomically (temp file + rename).

A record whose file cannot be parsed, or whose stored key does not match its content,
is treated as absent (and reported), never trusted.  Reading never moves a file; writers
about to recompute a cell quarantine its invalid file (`get(key, quarantine=True)`), as
does `qbench migrate`.  The record itself (schema, key, provenance): qbench.record."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qbench.atomic import FileLock, StoreError  # StoreError: the results folder cannot be written (exit 5)
# the record's schema, key and provenance live in qbench.record; imported here for the store
from qbench.record import (  # noqa: F401  (cell_key, git_sha, library_versions, machine: for existing callers)
    Record, cell_key, git_sha, library_versions, machine, record_order, validate_record,
)

RECORDS = "records"
QUARANTINE = ".quarantine"


# Bounds of a record file: a record is ~10 KB; anything far larger is damage or an attack,
# skipped by readers (and quarantined by writers) rather than read.
MAX_RECORD_BYTES = 4 << 20
MIN_FREE_BYTES = 16 << 20  # free space a run needs before its first cell: a few thousand records


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

    def read_file(self, path: Path) -> tuple[Record | None, str | None]:
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
        return (Record(record), None) if (why := validate_record(record, path.stem)) is None else (None, why)

    def get(self, key: str, quarantine: bool = False) -> Record | None:
        """The valid record for `key`, or None.  An invalid file (unparsable, inconsistent
        key, failing the schema) is skipped with a one-line warning and left where it is:
        reading never moves a file.  `quarantine=True` is for writers about to compute the
        cell: the invalid file is moved to records/.quarantine/ (kept for inspection)."""
        path = self.path(key)
        if not os.path.lexists(path):  # lexists: a dangling symlink is still invalid
            return None
        record, why = self.read_file(path)
        if why is not None and why != "missing":
            if quarantine:
                self.quarantine(path, why)
            else:
                self._warn(f"invalid record {path.name} ({why}) skipped; `qbench bench` recomputes it and "
                           f"moves the file to {QUARANTINE}/")
        return record

    def quarantine(self, path: Path, why: str) -> Path | None:
        """Move an invalid record file to records/.quarantine/: only writers (bench, sweep,
        migrate) call it, never a reader."""
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
        self._warn(f"invalid record {path.name} ({why}) moved to {target}")
        return target

    def _warn(self, line: str) -> None:
        if self._warned < MAX_QUARANTINE_WARNINGS:
            self._warned += 1
            print(f"qbench: warning: {line}", file=sys.stderr)
        else:
            self._unlisted += 1

    def _summarise_quarantine(self) -> None:
        if self._unlisted:
            print(f"qbench: warning: {self._unlisted} more invalid records skipped or quarantined "
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

    def records(self) -> list[Record]:
        """Every valid record; invalid files are skipped with a warning and never moved (see
        `corrupt()`).  In the order of
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

