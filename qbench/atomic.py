"""Crash- and concurrency-safe files: every temp file has a unique name (pid + random, in
the target's folder, so the final rename is atomic), new files get the umask's mode, and
`FileLock` is an advisory lock (flock) that the kernel releases when its holder dies, so a
killed process never leaves a lock stuck."""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import time
from pathlib import Path


def file_mode() -> int:
    """The mode a plain `open()` would give a new file under the current umask (mkstemp
    creates 0600; a store shared on a cluster needs the group's bits)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> Path:
    """Write through a unique temp file and a rename; the temp file never lingers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync)


def atomic_save_npy(path: Path, array) -> Path:
    """np.save through a unique temp file (np.save on a name would append `.npy`)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return atomic_write_bytes(path, buffer.getvalue(), fsync=False)


class FileLock:
    """An exclusive advisory lock on `path` (created if missing).  `acquire(blocking=False)`
    returns False when another process holds it.  Released on `release()`, on exit from a
    `with` block, or by the kernel when the process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking and deadline is None else fcntl.LOCK_NB))
                self.fd = fd
                return True
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    os.close(fd)
                    return False
                time.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


WRITER_LOCK = ".qbench-writer.lock"


class StoreError(OSError):
    """A results or output folder that cannot be written (exit 5); qbench.results.StoreError."""


class output_lock:
    """One writer per output folder (`qbench train --out`, `qbench retrofit --out`): an
    advisory lock on `<out>/.qbench-writer.lock`, held while the command writes, released
    by the kernel if it dies.  A second writer gets a StoreError (exit 5) at once, one line."""

    def __init__(self, out: Path, command: str):
        self.lock, self.out, self.command = FileLock(Path(out) / WRITER_LOCK), Path(out), command

    def __enter__(self):
        try:
            held = self.lock.acquire(blocking=False)
        except OSError as err:
            raise StoreError(f"{self.out} cannot be written ({err.strerror or err})") from None
        if not held:
            raise StoreError(f"{self.out} is being written by another qbench {self.command} (it holds "
                             f"{WRITER_LOCK}); wait for it or choose another --out")
        return self

    def __exit__(self, *exc):
        self.lock.release()
