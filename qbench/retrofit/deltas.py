"""A finished retrofit: `deltas.safetensors` (the trainable tensors) and `retrofit.json`
(the base and its checkpoint hash, arm, seed, recipe); loading checks the base's hash and
applies the deltas; the zoo knows such folders by `retrofit.json` (qbench.zoo.FOLDER_KINDS
names `retrofit_ref`, imported when such a folder is first met)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_FILE = "retrofit.json"
DELTAS_FILE = "deltas.safetensors"


def save_deltas(model, names: list[str], out: Path, dtype: str) -> Path:
    from safetensors.torch import save

    from qbench.atomic import atomic_write_bytes

    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu", getattr(torch, dtype)).contiguous() for n in names}
    return atomic_write_bytes(out / DELTAS_FILE, save(tensors, metadata={"format": "qbench-retrofit-deltas"}))


def retrofit_files(folder: Path) -> list[Path]:
    return [folder / DELTAS_FILE, folder / CONFIG_FILE]


def load_retrofit(folder: Path, name: str | None = None):
    """The base model with the arm installed and the deltas applied (float32), checked
    against the base's checkpoint hash; a LoadedModel."""
    from safetensors.torch import load_file

    from qbench.modeling.llama_arms import install_arm
    from qbench.zoo import CheckpointError, LoadedModel, file_hash, resolve_model

    facts = read_retrofit_config(folder)
    ref = resolve_model(facts["base"])
    if ref.checkpoint_hash != facts["base_checkpoint_hash"]:
        raise CheckpointError(f"{folder}: its base {facts['base']} has checkpoint hash {ref.checkpoint_hash}, the "
                              f"deltas were trained on {facts['base_checkpoint_hash']}")
    loaded = ref.load()
    model = loaded.model
    install_arm(model, facts["arm"])
    try:
        deltas = load_file(str(folder / DELTAS_FILE))
    except Exception as err:
        raise CheckpointError(f"{folder / DELTAS_FILE} is unreadable: {err}") from err
    params = dict(model.named_parameters())
    unknown = sorted(set(deltas) - set(params))
    missing = sorted(set(facts["trainable"]) - set(deltas))
    if unknown or missing:
        raise CheckpointError(f"{folder / DELTAS_FILE} does not fit {facts['base']} + {facts['arm']}: "
                              f"unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for n, t in deltas.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"{folder / DELTAS_FILE}: {n} has shape {tuple(t.shape)}, "
                                      f"the model {tuple(params[n].shape)}")
            params[n].copy_(t.float())
    info = {"arm": f"{facts['arm']} (retrofit)", "retrofit": {k: facts[k] for k in
                                                            ("base", "base_checkpoint_hash", "arm", "seed", "trainable")
                                                            if k != "trainable"},
            "preset": facts["recipe"]["name"], "seed": facts["seed"]}
    checkpoint_hash = file_hash(retrofit_files(folder))
    return LoadedModel(name or folder.name, model.eval(), loaded.tokenizer, checkpoint_hash, info)


def read_retrofit_config(folder: Path) -> dict:
    from qbench.zoo import CheckpointError

    path = folder / CONFIG_FILE
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is missing or unreadable: {err}") from err
    needed = {"base", "base_checkpoint_hash", "arm", "seed", "recipe", "trainable"}
    if not isinstance(facts, dict) or not needed <= set(facts):
        raise CheckpointError(f"{path} is not a retrofit description (needs {sorted(needed)})")
    if not (folder / DELTAS_FILE).is_file():
        raise CheckpointError(f"{folder / DELTAS_FILE} is missing")
    return facts


def retrofit_ref(name: str, folder: Path, entry: dict):
    """The zoo's ModelRef of a retrofit folder: checked and hashed, loaded on demand."""
    from qbench.zoo import ModelRef, file_hash

    facts = read_retrofit_config(folder)
    info = {"arm": f"{facts['arm']} (retrofit)", "preset": facts["recipe"]["name"], "seed": facts["seed"],
            "base": facts["base"], **dict(entry)}
    return ModelRef(name, file_hash(retrofit_files(folder)), info, None, lambda: load_retrofit(folder, name))
