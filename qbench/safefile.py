"""One way to open any file qbench reads: weights, configs, caches, recipes, records,
retrofit.json, suites, zoo.yaml, corpora, training states.

Only a regular file is read (symlinks to one are followed unless `follow=False`): the
file is opened non-blocking (a FIFO with no writer does not block the open), then
`fstat` must say S_ISREG before one byte is read, so a FIFO, `/dev/zero` (or a symlink to
it), a socket or a folder is refused at once, and its size must be within the cap of its
kind.  Refusals are `UnsafeFileError` (an OSError) with one line naming the file, its
kind and why; callers turn it into their own error (and so their exit code).
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat

MiB, GiB = 1 << 20, 1 << 30

# The largest file qbench reads of each kind: far above any real one, far below memory.
LIMITS: dict[str, int] = {
    "weights": 512 * GiB,  # safetensors / .bin / .gguf shards and every file a checkpoint hash covers
    "state": 512 * GiB,    # train_state.* / retrofit_state.*
    "config": 1 * MiB,     # config.json
    "retrofit": 1 * MiB,   # retrofit.json
    "recipe": 1 * MiB,     # train / retrofit recipe .yaml
    "suite": 1 * MiB,      # suites/*.yaml
    "zoo": 4 * MiB,        # models/zoo.yaml
    "record": 4 * MiB,     # one result record (qbench.results.MAX_RECORD_BYTES)
    "corpus": 1 * GiB,     # one corpus text file
    "cache": 16 * GiB,     # token cache, FP-logit batches, FP task outputs
    "manifest": 1 * MiB,   # training-state manifests, bundle manifests
}


class UnsafeFileError(OSError):
    """A file that is not a regular file, or over its kind's size cap."""

    def __init__(self, path, kind: str, why: str):
        super().__init__(f"{kind} file {path} is {why}")
        self.path, self.kind, self.why = path, kind, why

    def __reduce__(self):  # pickled to and from sweep workers
        return type(self), (self.path, self.kind, self.why)


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "something else"


def cap(kind: str, max_bytes: int | None = None) -> int:
    return LIMITS[kind] if max_bytes is None else max_bytes


def open_regular(path, kind: str, max_bytes: int | None = None, follow: bool = True):
    """A binary file object (blocking reads) on the regular file `path`, at most the cap of
    `kind` (or `max_bytes`) long.  FileNotFoundError passes through unchanged."""
    limit = cap(kind, max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow:
            raise UnsafeFileError(path, kind, "a symbolic link, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(path, kind, f"{_kind_of(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise UnsafeFileError(path, kind, f"{info.st_size} bytes, over the {limit} byte limit of a {kind} file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, kind: str, max_bytes: int | None = None, follow: bool = True) -> bytes:
    """The whole regular file (a file that grew past the cap while read is refused too)."""
    limit = cap(kind, max_bytes)
    with open_regular(path, kind, limit, follow) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1)  # the size fstat gave (never a read sized by the cap: it may be 512 GiB)
        while len(data) <= limit:  # a file still growing: on to the cap, not past it
            more = f.read(min(1 << 20, limit + 1 - len(data)))
            if not more:
                break
            data += more
    if len(data) > limit:
        raise UnsafeFileError(path, kind, f"over the {limit} byte limit of a {kind} file")
    return data


def read_text(path, kind: str, max_bytes: int | None = None) -> str:
    """UTF-8 text of a regular file (UnicodeDecodeError is a ValueError the caller words)."""
    return read_bytes(path, kind, max_bytes).decode("utf-8")


def check_regular(path, kind: str, max_bytes: int | None = None) -> int:
    """Before a library opens `path` itself (safetensors, torch, transformers): it is a
    regular file within its cap.  Returns its size."""
    with open_regular(path, kind, max_bytes) as f:
        return os.fstat(f.fileno()).st_size


def hash_files(paths, digest, kind: str = "weights", max_bytes: int | None = None) -> None:
    """Feed regular files into `digest` in 1 MiB blocks (never /dev/zero, never a FIFO)."""
    for path in paths:
        with open_regular(path, kind, max_bytes) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)


def load_npy(path, kind: str = "cache", max_bytes: int | None = None, shape: tuple | None = None,
             dtype=None):
    """A .npy array from a regular file, its header checked before anything is allocated:
    no pickled objects, the declared shape x itemsize must be exactly the bytes the file
    holds (a header declaring 10^13 elements is refused, not allocated), and, when given,
    the shape and dtype must be those expected.  Anything else is a ValueError."""
    import numpy as np

    with open_regular(path, kind, max_bytes) as f:
        size = os.fstat(f.fileno()).st_size
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            found, fortran, found_dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            found, fortran, found_dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: unsupported .npy version {version}")
        if found_dtype.hasobject:
            raise ValueError(f"{path}: holds Python objects (refused: no pickle)")
        if shape is not None and tuple(found) != tuple(shape):
            raise ValueError(f"{path}: shape {tuple(found)}, expected {tuple(shape)}")
        if dtype is not None and found_dtype != np.dtype(dtype):
            raise ValueError(f"{path}: dtype {found_dtype}, expected {np.dtype(dtype)}")
        count = 1
        for n in found:
            count *= int(n)
        if count * found_dtype.itemsize != size - f.tell():
            raise ValueError(f"{path}: header declares shape {tuple(found)} ({count * found_dtype.itemsize} bytes) "
                             f"but the file holds {size - f.tell()} bytes of data (truncated or forged)")
        data = f.read()
    array = np.frombuffer(data, dtype=found_dtype)
    return array.reshape(found, order="F" if fortran else "C").copy() if count else array.reshape(found)


def no_alias_loader():
    """A yaml SafeLoader that refuses aliases (`*name`): a small file of lists of names must
    not expand to billions of strings ("billion laughs").  Suites, zoo.yaml, recipes."""
    import yaml

    global _NO_ALIAS
    if _NO_ALIAS is None:
        class NoAliasLoader(yaml.SafeLoader):
            def compose_node(self, parent, index):
                if self.check_event(yaml.AliasEvent):
                    event = self.peek_event()
                    raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in this file "
                                                      "(write the entries out)", event.start_mark)
                return super().compose_node(parent, index)

        _NO_ALIAS = NoAliasLoader
    return _NO_ALIAS


_NO_ALIAS = None


def load_yaml(text: str):
    """yaml.safe_load without aliases (no_alias_loader); YAMLError / RecursionError pass through."""
    import yaml

    return yaml.load(text, Loader=no_alias_loader())  # noqa: S506 (a SafeLoader without aliases)


def describe(err: OSError, prefix: str) -> str:
    """One line for an OSError from these readers: a refusal says what the file is (its
    message names it); any other error is `prefix: strerror`."""
    if isinstance(err, UnsafeFileError):
        return str(err)
    return f"{prefix}: {err.strerror or err}"
