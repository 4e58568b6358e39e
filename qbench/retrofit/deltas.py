"""A finished retrofit: `deltas.safetensors` (the trainable tensors) and `retrofit.json`
(the base and its checkpoint hash, arm, seed, recipe); loading checks the base's hash and
applies the deltas.  The zoo knows such folders by `retrofit.json` and loads them through
this module (qbench.zoo._retrofit_ref), which therefore imports nothing of the zoo."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from qbench.errors import CheckpointError

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


def install_deltas(model, folder: Path, facts: dict) -> None:
    """Into the loaded base `model` (its hash checked by the caller against
    `facts["base_checkpoint_hash"]`): the arm installed, the deltas applied (float32), the
    clamp installed where the run had one."""
    from safetensors.torch import load_file

    from qbench.modeling.llama_arms import install_arm

    install_arm(model, facts["arm"])
    from qbench.safefile import check_regular

    try:
        check_regular(folder / DELTAS_FILE, "weights")  # not a FIFO, not a link to /dev/zero
        deltas = load_file(str(folder / DELTAS_FILE))
    except Exception as err:
        raise CheckpointError(f"{folder / DELTAS_FILE} is unreadable: {' '.join(str(err).split())[:200]}") from None
    params = dict(model.named_parameters())
    unlisted = sorted(set(deltas) & set(params) - set(facts["trainable"]))
    if unlisted:  # a base tensor the retrofit did not train would silently replace the base's
        raise CheckpointError(f"{folder / DELTAS_FILE} holds {len(unlisted)} tensors that retrofit.json's "
                              f"`trainable` does not list (e.g. {unlisted[0]}); refused")
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
    if facts.get("clamp"):  # the clamp-and-repair test: the model runs clamped wherever it is evaluated
        from qbench.retrofit.clamp import install_clamp

        clamp = facts["clamp"]
        if not isinstance(clamp, dict) or not isinstance(clamp.get("layer"), int) or \
                not isinstance(clamp.get("cap"), (int, float)) or not clamp["cap"] > 0:
            raise CheckpointError(f"{folder / CONFIG_FILE}: `clamp` must give an integer layer and a cap > 0")
        try:
            install_clamp(model, clamp["layer"], float(clamp["cap"]))
        except ValueError as err:
            raise CheckpointError(f"{folder / CONFIG_FILE}: {err}") from None


def loaded_info(facts: dict) -> dict:
    """The facts a loaded retrofit carries (LoadedModel.info)."""
    return {"arm": f"{facts['arm']} (retrofit)", "retrofit": {k: facts[k] for k in
                                                             ("base", "base_checkpoint_hash", "arm", "seed", "trainable")
                                                             if k != "trainable"},
            "clamp": facts.get("clamp"),
            "preset": facts["recipe"]["name"], "seed": facts["seed"]}


def ref_info(facts: dict, entry: dict) -> dict:
    """The facts the zoo's reference to a retrofit carries (ModelRef.info), its zoo entry last."""
    return {"arm": f"{facts['arm']} (retrofit)", "preset": facts["recipe"]["name"], "seed": facts["seed"],
            "base": facts["base"], **dict(entry)}


MAX_CONFIG_DEPTH = 32  # retrofit.json is a flat description: its recipe is one level down


def read_retrofit_config(folder: Path, max_bytes: int | None = None) -> dict:
    """retrofit.json checked before any field is used: a regular file within its cap
    (qbench.safefile, kind "retrofit"), JSON of bounded depth, each needed field of its
    type; anything else is one CheckpointError line (exit 3)."""
    from qbench.safefile import read_text

    path = folder / CONFIG_FILE
    try:
        text = read_text(path, "retrofit", max_bytes)
    except OSError as err:
        from qbench.safefile import describe

        raise CheckpointError(describe(err, f"{path} is missing or unreadable")) from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not UTF-8 ({err.reason})") from None
    if _depth(text) > MAX_CONFIG_DEPTH:
        raise CheckpointError(f"{path} is nested more than {MAX_CONFIG_DEPTH} levels deep; not a retrofit description")
    try:
        facts = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({type(err).__name__})") from None
    needed = {"base": str, "base_checkpoint_hash": str, "arm": str, "seed": int, "recipe": dict, "trainable": list}
    if not isinstance(facts, dict) or not set(needed) <= set(facts):
        raise CheckpointError(f"{path} is not a retrofit description (needs {sorted(needed)})")
    for key, kind in needed.items():
        if not isinstance(facts[key], kind) or isinstance(facts[key], bool):
            raise CheckpointError(f"{path}: `{key}` is a {type(facts[key]).__name__}, not a {kind.__name__}")
    if not all(isinstance(n, str) for n in facts["trainable"]) or not isinstance(facts["recipe"].get("name", ""), str):
        raise CheckpointError(f"{path}: `trainable` must list tensor names and `recipe.name` be a string")
    facts["recipe"].setdefault("name", "?")
    if not os.path.lexists(folder / DELTAS_FILE):
        raise CheckpointError(f"{folder / DELTAS_FILE} is missing")
    return facts


def _depth(text: str) -> int:
    """The deepest nesting of brackets outside strings (json.loads recurses per level)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
