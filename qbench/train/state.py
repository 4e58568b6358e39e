"""A run's resume state, in two forms.

While it runs, `qbench train` writes `train_state.pt` every `save_every` steps (model,
optimizer, data-generator and RNG states, step, elapsed time), read back with torch's
restricted unpickler (`load_train_state`).  A run stopped on a GPU machine is handed back
as `train_state.safetensors` (`save_state`; scripts/gpu_campaign.py does it; no pickle):
the model, AdamW's moments and step counts, the generator's and torch's RNG states as
tensors, the recipe, step, elapsed time and optimizer settings as JSON in the file's
metadata.  A rerun of the same command in a folder holding only that file resumes from
it (`load_state`), bit-for-bit as from the .pt."""
from __future__ import annotations

import json
from pathlib import Path

import torch

STATE_FILE = "train_state.pt"
TRAVEL_FILE = "train_state.safetensors"
NEEDED = {"recipe", "model", "optimizer", "generator", "torch_rng", "step", "elapsed"}


def save_state(state: dict, path: Path) -> None:
    """`state` as train() saves it -> one safetensors file."""
    from safetensors.torch import save_file

    from qbench.atomic import temp_path

    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    moments = {}
    for index, values in state["optimizer"]["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                moments[f"{index}.{key}"] = value
    tensors["generator"], tensors["torch_rng"] = state["generator"], state["torch_rng"]
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    meta = {"recipe": state["recipe"], "step": state["step"], "elapsed": state["elapsed"],
            "param_groups": state["optimizer"]["param_groups"], "optimizer_scalars": moments}
    tmp = temp_path(path)
    try:
        save_file(tensors, str(tmp), metadata={"qbench_train_state": json.dumps(meta)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path) -> dict:
    """The state dict train() resumes from; a CheckpointError names a file that is not one."""
    from safetensors import SafetensorError, safe_open

    from qbench.zoo import CheckpointError

    from qbench.safefile import check_regular

    try:
        check_regular(path, "state")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["qbench_train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _unflatten(meta, tensors)
    except (SafetensorError, KeyError, OSError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a qbench training state ({type(err).__name__}: {err}); "
                              "delete it to start this run over") from None


def _unflatten(meta: dict, tensors: dict) -> dict:
    state: dict = {"state": {}, "param_groups": meta["param_groups"]}
    for group in state["param_groups"]:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    moments = {k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")}
    for key, value in {**moments, **meta["optimizer_scalars"]}.items():  # "<param index>.<name>"
        index, name = key.split(".", 1)
        state["state"].setdefault(int(index), {})[name] = value
    return {"recipe": meta["recipe"], "step": meta["step"], "elapsed": meta["elapsed"], "optimizer": state,
            "model": {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
            "generator": tensors["generator"], "torch_rng": tensors["torch_rng"]}


def load_train_state(path: Path) -> dict:
    """The resume state, read with torch's restricted unpickler (`weights_only=True`: tensors,
    plain containers and numbers only), so a crafted file in --out cannot run code; anything
    else is a CheckpointError that names the file."""
    import pickle

    from qbench.zoo import CheckpointError

    from qbench.safefile import check_regular

    try:
        check_regular(path, "state")  # not a FIFO, not a link to /dev/zero
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a plain training state (refused to unpickle it: {first[:200]}); "
                              "delete it to start this run over") from err
    if not isinstance(state, dict) or not NEEDED <= set(state):
        raise CheckpointError(f"{path} is not a qbench training state (missing {sorted(NEEDED - set(state or {}))}); "
                              "delete it to start this run over")
    return state


def atomic_torch_save(obj, path: Path) -> None:
    from qbench.atomic import temp_path

    tmp = temp_path(path)
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
