"""What a record says about its model and its scheme (`record["facts"]`, outside the key),
so the report places it without the live registries; FACT_TYPES below is its shape (each
value may also be null), checked by the record schema (qbench.record).

One definition for the three places that need it: the planner writes them into new records
(from the resolved scheme and the model's info), `qbench migrate` adds them to older records
(from the scheme JSON in their config and the zoo entry), and the report derives them for
any record that still lacks them.  Reads JSON and dicts only: no torch, quant or modeling."""
from __future__ import annotations

import json

FACT_TYPES = {"model": {"arm": str, "preset": str},
              "scheme": {"backend": str, "weight_bits": int, "activation_bits": int, "kv_bits": int,
                         "attention_kernel": bool}}


def scheme_facts_from_json(spec) -> dict | None:
    """Scheme facts from a scheme's JSON (a string or its parsed dict); None when `spec` is
    not a scheme (e.g. a bare name)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return None
    if not isinstance(spec, dict) or "backend" not in spec:
        return None
    options = spec.get("options") or {}
    return {"backend": spec["backend"], "weight_bits": spec.get("weight_bits"),
            "activation_bits": spec.get("activation_bits"), "kv_bits": (options.get("kv_cache") or {}).get("bits"),
            "attention_kernel": bool(options.get("attention_kernel"))}


def model_facts_from_info(info: dict) -> dict:
    """Model facts from a model's info: its zoo entry, or the training facts of a folder."""
    training = info.get("training") or {}
    return {"arm": info.get("arm") or training.get("attention"), "preset": info.get("preset") or training.get("preset")}


def model_facts_from_zoo(model: str, zoo: dict) -> dict | None:
    """Model facts of a record's model name (`name@hash` too) from the zoo; None outside it."""
    entry = zoo.get(model.split("@", 1)[0])
    return {"arm": entry.get("arm"), "preset": entry.get("preset")} if entry else None
