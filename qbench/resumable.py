"""The skeleton of a resumable training run, shared by `qbench train` (qbench.train) and
`qbench retrofit` (qbench.retrofit): one writer per output folder, `--set key=value` and
recipe YAML files read one way (the hardened loader of suite files: no aliases, a size
cap), the recipe compared with the saved one before a resume, the warm-up + cosine
schedule, the CSV logs cut back to the resumed step, and one optimiser step.

What differs stays with each run: the model it builds, what its state file holds
(qbench/train/state.py, qbench/retrofit/state.py) and the facts it writes at the end."""
from __future__ import annotations

import csv
import math
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def run_folder(out, kind: str):
    """`out` created and held with its writer lock (qbench.atomic.output_lock) for the run:
    a second `qbench <kind>` into the same folder stops at once with one line (exit 5)."""
    from qbench.atomic import output_lock

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, kind):
        yield out


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads, checked and capped to this machine (None: leave them)."""
    if threads is not None:
        import torch

        from qbench.validate import thread_count

        torch.set_num_threads(thread_count(threads))


def parse_set_pairs(pairs: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> {key: value} (values as written; the recipe converts them)."""
    settings = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: use key=value")
        settings[key] = value
    return settings


def read_recipe_yaml(path) -> dict:
    """A recipe YAML file's mapping, read as suite files are (qbench.safefile: a regular
    file under the size cap, no aliases); every refusal is a one-line ValueError."""
    import yaml

    from qbench.safefile import describe, load_yaml, read_text

    try:
        data = load_yaml(read_text(path, "recipe")) or {}
    except OSError as err:
        raise ValueError(describe(err, f"recipe file {path}")) from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"recipe file {path} is not valid YAML: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {path} must be a mapping of recipe keys")
    return data


def changed_keys(saved: dict, wanted: dict, keys=None) -> list[str]:
    """The keys whose values differ between a saved run and the one asked for (all keys of
    either, sorted, when `keys` is None): what a refused resume names."""
    keys = sorted(set(saved) | set(wanted)) if keys is None else keys
    return [k for k in keys if saved.get(k) != wanted.get(k)]


def schedule_factor(step: int, warmup: int, steps: int, schedule: str = "cosine") -> float:
    """The learning rate at `step` as a fraction of the peak: linear warm-up over `warmup`
    steps, then cosine decay to 10% of the peak at `steps` ("cosine") or the peak held
    ("constant")."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def truncate_log(path: Path, last_step: int) -> None:
    """A CSV log (first column: the step) cut back to the rows up to `last_step` (the rows
    past a resumed state are written again, identically); with `last_step` < 0 (a run
    starting over) the file is removed.  Rewritten in one atomic rename."""
    path = Path(path)
    if not path.exists():
        return
    if last_step < 0:
        path.unlink()
        return
    import io

    from qbench.atomic import atomic_write_text

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    text = io.StringIO()
    csv.writer(text).writerows(rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= last_step])
    atomic_write_text(path, text.getvalue())


def append_row(path: Path, row: dict) -> None:
    """One row appended to a CSV log; the header is written with the first row, and keys
    the header lacks are dropped (a log's columns are fixed by its first row)."""
    fields = list(row)
    new = not Path(path).exists()
    if not new:
        with open(path, newline="") as f:
            fields = next(csv.reader(f), fields)
        fields += [k for k in row if k not in fields]
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def optimizer_step(model, optimizer, batch, *, device: str, amp: str | None, grad_clip: float | None,
                   check_finite: bool = True, step: int | None = None):
    """One update on `batch` (next-token loss on itself), under bf16 autocast when `amp`
    is "bf16", gradients clipped to `grad_clip` (None or <= 0: not clipped); returns the
    loss.  With `check_finite` a non-finite loss is a FloatingPointError before the update."""
    import torch

    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        loss = model(batch, labels=batch).loss
    if check_finite and not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip and grad_clip > 0:  # parameters without a gradient (frozen ones) do not count
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss
