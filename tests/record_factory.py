"""The one way tests make a result record by hand: `make_record` builds a record the store's
schema accepts (qbench.record), keyed by the hash of its config like a real one.  Tests
that need a record the schema refuses make a valid one and damage it."""
from __future__ import annotations

from qbench.record import Record, cell_key


def make_record(model: str = "m", scheme: str = "fp32", task: str = "ppl", metrics: dict | None = None, *,
                protocol: str = "p", status: str = "ok", calibration_seed: int | None = None,
                config: dict | None = None, key: str | None = None, facts: dict | None = None,
                checkpoint: str = "0" * 16, **fields) -> Record:
    """A record of one cell.  `config` (default: model with its checkpoint hash, scheme,
    task, protocol and the draw) decides the key unless `key` is given (records that
    never reach a store); `fields`: any other top-level field (error, provenance, ...)."""
    if config is None:
        config = {"model": {"name": model, "checkpoint_hash": checkpoint}, "scheme": scheme, "task": task,
                  "protocol": protocol}
        if calibration_seed is not None:
            config["calibration_seed"] = calibration_seed
    record = Record.start(key=key or cell_key(config), config=config, model=model, scheme=scheme, task=task,
                          protocol=protocol, calibration_seed=calibration_seed, facts=facts)
    if facts is None:
        del record["facts"]
    record.update(status=status, metrics={} if metrics is None and status == "failed" else metrics, **fields)
    if record["metrics"] is None:
        del record["metrics"]
    return record
