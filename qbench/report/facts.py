"""What each record says about its scheme and its model, and the matrix's order from it.

The report reads these facts from the records, never from the live registries (it imports
neither qbench.quant nor qbench.modeling), so a record keeps its place in the report after
the scheme or the arm that computed it is renamed or removed.  A record carries them in
`facts` (shape: qbench.facts.FACT_TYPES).

Older records do not: their scheme facts come from the scheme's JSON in `config.scheme`
(its options hold `attention_kernel` and `kv_cache`), their model facts from the zoo entry
of the model's name.

Order of the matrix (stated in its legend):
  columns  by group: the 16-bit reference (bf16, KV-cache-only schemes), 8-bit (every weight
           and activation width >= 8), lower bits, the attention kernel, then schemes whose
           record says nothing; within a group, the narrowest width widest first, then name;
  rows     by family (FAMILY_ORDER, then other families by name); within a family the
           softmax baseline first (a retrofit's `softmax (retrofit)` control included), then
           arms by name, then variant.
"""
from __future__ import annotations

from qbench.facts import model_facts_from_zoo, scheme_facts_from_json

FAMILY_ORDER = ["tiny", "small", "bb", "pretrained"]
BASELINE_ARM = "softmax"
REFERENCE_GROUP, EIGHT_BIT_GROUP, LOW_BIT_GROUP, KERNEL_GROUP, UNKNOWN_GROUP = range(5)


def scheme_facts(record: dict) -> dict | None:
    """The record's `facts.scheme`, else derived from its config's scheme JSON."""
    facts = (record.get("facts") or {}).get("scheme")
    return facts if facts is not None else scheme_facts_from_json((record.get("config") or {}).get("scheme"))


def model_facts(record: dict, zoo: dict) -> dict | None:
    """The record's `facts.model`, else the zoo entry's arm and preset (None outside the zoo)."""
    facts = (record.get("facts") or {}).get("model")
    if facts is not None:
        return facts
    return model_facts_from_zoo(record["model"], zoo)


def scheme_group(facts: dict | None) -> int:
    """0 reference, 1 8-bit, 2 lower bits, 3 the attention kernel, 4 unknown (no facts)."""
    if facts is None:
        return UNKNOWN_GROUP
    if facts.get("attention_kernel"):
        return KERNEL_GROUP
    bits = [b for b in (facts.get("weight_bits"), facts.get("activation_bits")) if b]
    if facts.get("backend") == "reference" or not bits:
        return REFERENCE_GROUP
    return EIGHT_BIT_GROUP if min(bits) >= 8 else LOW_BIT_GROUP


def scheme_width(facts: dict | None) -> int:
    """The narrowest weight or activation width, else the KV cache's, else 16 (a 16-bit
    reference such as bf16); 0 for a record without facts."""
    if facts is None:
        return 0
    bits = [b for b in (facts.get("weight_bits"), facts.get("activation_bits")) if b]
    return min(bits) if bits else facts.get("kv_bits") or 16


def scheme_sort_key(name: str, group: int, width: int) -> tuple:
    return group, -width, name


def row_identity(model: str, facts: dict | None, zoo: dict) -> tuple[str, str, str]:
    """(family, arm, variant) of a model: its preset and arm; the step count joins the arm
    where a checkpoint trained longer than its preset (`-3k`); a model without a preset
    (outside the zoo) is its own row; a pretrained model is its own arm."""
    base = model.split("@", 1)[0]
    if not facts or not facts.get("preset"):
        return "other", model, ""
    family = facts["preset"]
    arm = facts.get("arm") or base if family != "pretrained" else base
    entry = zoo.get(base) or {}
    variant = f"{entry['steps']} steps" if base.endswith("-3k") and "steps" in entry else ""
    if "@" in model:  # a changed checkpoint: never folded with the zoo's
        variant = (variant + " " if variant else "") + model.split("@", 1)[1]
    return family, arm, variant


def row_identities(records: list[dict], zoo: dict) -> dict[str, tuple[str, str, str]]:
    """model -> (family, arm, variant), from the first record of the model that carries
    model facts, else from the zoo."""
    facts: dict[str, dict | None] = {}
    for r in records:
        if facts.get(r["model"]) is None:
            facts[r["model"]] = model_facts(r, zoo)
    return {model: row_identity(model, f, zoo) for model, f in facts.items()}


def row_sort_key(family: str, arm: str, variant: str) -> tuple:
    family_rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    return family_rank, family, arm.split(" ", 1)[0] != BASELINE_ARM, arm, variant


def scheme_facts_by_name(records: list[dict]) -> dict[str, dict | None]:
    """scheme name -> facts, from the first record of the scheme that has any."""
    facts: dict[str, dict | None] = {}
    for r in records:
        if facts.get(r["scheme"]) is None:
            facts[r["scheme"]] = scheme_facts(r)
    return facts
