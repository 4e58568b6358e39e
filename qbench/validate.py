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
