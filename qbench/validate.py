"""Checks of user-given options, shared by the CLI and suite files: each failure is a
UsageError (exit 2) whose one-line message names the option, raised before any work."""
from __future__ import annotations


class UsageError(ValueError):
    """A bad option or argument (exit 2)."""


MAX_SEED = 2 ** 32 - 1  # numpy's and most samplers' bound
MAX_COUNT = 10 ** 12  # --limit, --task-limit, suite limits: far above any corpus, far below overflow


def positive_int(value, option: str, allow_none: bool = True, maximum: int = MAX_COUNT) -> int | None:
    """An integer in 1..maximum (None passes when allowed); bools and non-integers are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise UsageError(f"{option} must be a positive integer, got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UsageError(f"{option} must be a positive integer, got {value!r}") from None
    if number < 1 or str(number) != str(value).strip().lstrip("+"):
        raise UsageError(f"{option} must be a positive integer, got {value!r}")
    if number > maximum:
        raise UsageError(f"{option} must be at most {maximum}, got {number}")
    return number


def non_negative_int(value, option: str) -> int | None:
    """An integer in 0..MAX_COUNT, or None."""
    if value is None or str(value).strip() == "0":
        return None if value is None else 0
    try:
        return positive_int(value, option)
    except UsageError:
        raise UsageError(f"{option} must be a non-negative integer, got {value!r}") from None


def seed_list(values, option: str) -> list[int] | None:
    """'0,1,2' or a list -> [0, 1, 2] (non-negative integers); empty -> None."""
    if values is None:
        return None
    parts = [p.strip() for p in values.split(",")] if isinstance(values, str) else list(values)
    parts = [p for p in parts if p != ""]
    if not parts:
        return None
    seeds = []
    for part in parts:
        if isinstance(part, bool):
            raise UsageError(f"{option}: {part!r} is not a seed (a non-negative integer)")
        try:
            seed = int(str(part).strip())
        except ValueError:
            raise UsageError(f"{option}: {part!r} is not a seed (a non-negative integer); "
                             f"give e.g. {option} 0,1,2") from None
        if seed < 0:
            raise UsageError(f"{option}: {part!r} is not a seed (a non-negative integer)")
        if seed > MAX_SEED:
            raise UsageError(f"{option}: {seed} is out of range (seeds are 0..{MAX_SEED})")
        seeds.append(seed)
    return seeds


def names(values: list[str], option: str) -> list[str]:
    """A non-empty list of non-empty names."""
    if not values:
        raise UsageError(f"{option} is empty: give at least one name")
    return values


MAX_THREADS = 1024  # --threads, suite resources num_cpus / num_gpus: far above any machine qbench runs on
MAX_CELLS = 100_000  # cells one plan may hold (the whole study is a few thousand); checked before building them


def thread_count(value, option: str = "--threads") -> int:
    """Threads torch may use: a positive integer up to MAX_THREADS (else a UsageError),
    then at most this machine's CPU count (threads past the cores only pile up)."""
    return cap_threads(positive_int(value, option, allow_none=False, maximum=MAX_THREADS))


def cap_threads(number) -> int:
    """1..this machine's CPU count."""
    import os

    return max(1, min(int(number), os.cpu_count() or 1))


def check_cell_count(count: int, where: str) -> None:
    if count > MAX_CELLS:
        raise UsageError(f"{where} asks for {count} cells, over the limit of {MAX_CELLS} per plan; "
                         "split it into smaller suites")


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(need: float, what: str, available: int | None = None) -> None:
    """A UsageError (exit 2) before allocating when `need` bytes (a lower bound of what
    `what` will allocate) exceed the memory available: one line, never a MemoryError."""
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise UsageError(f"{what} needs at least {need / 2 ** 30:.1f} GiB of memory, this machine has "
                         f"{available / 2 ** 30:.1f} GiB available; choose smaller values")
