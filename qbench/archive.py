"""Unpacking a tar file without trusting it.  Python's `filter="data"` (3.11.4+, 3.10.12+)
refuses absolute names, `..`, links out of the folder and device files; Debian 12's own
python3 is 3.11.2, which predates it, so there the same refusal is done here: only regular
files and folders with relative names that stay inside the destination are extracted."""
from __future__ import annotations

import tarfile
from pathlib import Path


class UnsafeArchiveError(ValueError):
    pass


def _check_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    root = dest.resolve()
    members = tar.getmembers()
    for member in members:
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"{tar.name}: {member.name!r} is neither a file nor a folder")
        target = (root / member.name).resolve()
        if member.name.startswith("/") or (target != root and root not in target.parents):
            raise UnsafeArchiveError(f"{tar.name}: {member.name!r} points outside {dest}")
    return members


def safe_extract(tar: tarfile.TarFile, dest: str | Path) -> None:
    """Extract every member of `tar` into `dest`, refusing what `filter="data"` refuses."""
    dest = Path(dest)
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    members = _check_members(tar, dest)
    for member in members:  # no owners or modes from the archive beyond the plain bits
        member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
    tar.extractall(dest, members=members)
