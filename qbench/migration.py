"""Migrate a result store to today's key: `qbench migrate --results DIR`.

Since issue 25 a scheme's part of a cell key is what computes (Scheme.key_json): its name
and description are prose, outside the key, and options that computed nothing left the
scheme (GPTQ's lazy-batch width, `block_size`: the same weights for any width).  Records
stored before hold the old scheme JSON in config.scheme, so their keys are recomputed
here: config.scheme loses the prose and those options, config.scheme_hash and the key
follow, and the record keeps its old key in `migrated_from`.  Metrics, provenance and
everything else are untouched.

Atomic per record (the new file is written by rename before the old one is removed; a
run killed in between leaves the old file, which the next run then just removes) and
idempotent (a record already in today's form is left alone).  A file that cannot be read
as a record, or whose key does not match its content, is quarantined with a one-line
reason, never guessed at."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qbench.facts import model_facts_from_zoo, scheme_facts_from_json
from qbench.quant.handlers import PROSE_FIELDS
from qbench.quant.scheme import key_json, scheme_hash
from qbench.results import ResultStore, cell_key, validate_record

# options that never changed a result, by options["method"]: dropped from stored schemes
DROPPED_OPTIONS = {"gptq": ("block_size",)}


@dataclass
class MigrationReport:
    migrated: list[tuple[str, str]] = field(default_factory=list)  # (old key, new key)
    current: int = 0  # already in today's form
    facts_added: int = 0  # current records that got their facts
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)

    def summary(self) -> str:
        return (f"{len(self.migrated)} record(s) migrated, {self.current} already current "
                f"({self.facts_added} given their facts), {len(self.quarantined)} quarantined")


def _stored_scheme(record: dict) -> dict | None:
    """config.scheme as a dict of fields, or None when it is not one."""
    config = record.get("config")
    text = config.get("scheme") if isinstance(config, dict) else None
    try:
        scheme = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return scheme if isinstance(scheme, dict) else None


def todays_scheme(fields: dict) -> dict:
    """A stored scheme's fields in today's form: no prose, no options that compute nothing."""
    fields = {k: v for k, v in fields.items() if k not in PROSE_FIELDS}
    options = fields.get("options")
    if isinstance(options, dict):
        dropped = DROPPED_OPTIONS.get(options.get("method"), ())
        fields["options"] = {k: v for k, v in options.items() if k not in dropped}
    return fields


def migrate_record(record: dict) -> dict:
    """The record under today's key (a new dict; the argument is not changed).  Raises
    ValueError with a one-line reason when it cannot be migrated."""
    scheme = _stored_scheme(record)
    if scheme is None:
        raise ValueError("config.scheme is not the JSON of a scheme")
    new_scheme = key_json(todays_scheme(scheme))
    config = {**record["config"], "scheme": new_scheme,
              "scheme_hash": scheme_hash(new_scheme)}
    key = cell_key(config)
    return {**record, "key": key, "config": config, "migrated_from": record["key"]}


def is_current(record: dict) -> bool:
    """Already in today's form (see todays_scheme)."""
    scheme = _stored_scheme(record)
    return scheme is not None and todays_scheme(scheme) == scheme


def with_facts(record: dict, zoo: dict) -> dict:
    """The record with `facts` (qbench.facts) where it lacks them and its model is in the zoo:
    scheme facts from its config's scheme JSON, model facts from the zoo entry.  A model
    outside the zoo keeps no facts (its checkpoint is not read here); the report then
    derives what it can, as before.  Facts are outside the key."""
    if record.get("facts") is not None:
        return record
    model = model_facts_from_zoo(record["model"], zoo)
    scheme = scheme_facts_from_json(record["config"].get("scheme"))
    if model is None or scheme is None:
        return record
    return {**record, "facts": {"model": model, "scheme": scheme}}


def migrate_store(results: Path | str, zoo: dict | None = None) -> MigrationReport:
    """Migrate every record of the store at `results` (its records/ folder) in place; add
    facts to those that lack them (`zoo`: default, models/zoo.yaml)."""
    if zoo is None:
        from qbench.zoo import read_zoo

        zoo = read_zoo()
    store = ResultStore(Path(results))
    report = MigrationReport()
    for path in sorted(store.records_dir.glob("*.json")):
        record, why = store.read_file(path)  # parsed and validated, as every reader of the store does
        if record is None:
            _quarantine(store, path, why, report)
            continue
        if is_current(record):
            report.current += 1
            if (completed := with_facts(record, zoo)) is not record:
                store.put(completed)  # same key: an atomic rewrite of the same file
                report.facts_added += 1
            continue
        try:
            new = with_facts(migrate_record(record), zoo)
        except ValueError as err:
            _quarantine(store, path, str(err), report)
            continue
        if (why := validate_record(new, new["key"])) is not None:
            _quarantine(store, path, f"migrated, it would not be valid: {why}", report)
            continue
        target = store.path(new["key"])
        if target.exists():
            held, _ = store.read_file(target)
            if held != new:  # another record computes the same cell: keep the first, set this one aside
                _quarantine(store, path, f"its new key {new['key']} is held by another record", report)
                continue
        else:
            store.put(new)
        path.unlink()
        report.migrated.append((path.stem, new["key"]))
    return report


def _quarantine(store: ResultStore, path: Path, why: str, report: MigrationReport) -> None:
    store.quarantine(path, why)
    report.quarantined.append((path.name, why))
