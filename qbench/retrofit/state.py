"""The optimiser (per-group learning rates, the schedule) and the resume state: one file,
`retrofit_state.safetensors` (trainable tensors, AdamW moments, generator state, and the
step and the run's facts as JSON in its metadata; no pickle), written by one atomic
rename, so a kill at any moment leaves the previous state or the new one, never a mix.
(States written before this change kept the step in a second file, `retrofit_state.json`;
they still resume when both files are there, and a lone half is refused in one line.)"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qbench.resumable import schedule_factor
from qbench.retrofit.recipes import RetrofitRecipe

STATE_FILE = "retrofit_state.safetensors"
STATE_META = "retrofit_state.json"


def arm_parameters() -> dict:
    """Every parameter an arm declares (qbench.modeling.attention.NORMALISER_PARAMETERS), by name."""
    from qbench.modeling.attention import NORMALISER_PARAMETERS

    return {p.name: p for declared in NORMALISER_PARAMETERS.values() for p in declared}


def group_peak_lr(name: str, recipe: RetrofitRecipe) -> float:
    return recipe.lr if name == "gates" else recipe.base_lr if name == "base" else recipe.sink_lr


def build_optimizer(model, names: list[str], recipe: RetrofitRecipe) -> torch.optim.AdamW:
    """Gates at `lr`, base weights at `base_lr` with weight decay, and each parameter an arm
    declares (a sink logit) at `sink_lr` with the Adam epsilon it declares (1e-30 for a sink
    logit: its update is then sign-like and the logit can climb to where the sink matters)."""
    params, declared = dict(model.named_parameters()), arm_parameters()
    gates = [params[n] for n in names if ".qbench_gate." in n]
    groups = [{"params": gates, "lr": recipe.lr, "weight_decay": 0.0, "name": "gates"}]
    for pname, spec in declared.items():
        members = [params[n] for n in names if n.rsplit(".", 1)[-1] == pname]
        groups.append({"params": members, "lr": recipe.sink_lr, "weight_decay": 0.0, "eps": spec.adam_eps,
                       "name": f"arm:{pname}"})
    base = [params[n] for n in names if ".qbench_gate." not in n and n.rsplit(".", 1)[-1] not in declared]
    groups.append({"params": base, "lr": recipe.base_lr, "weight_decay": recipe.weight_decay, "name": "base"})
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))


def lr_factor(step: int, recipe: RetrofitRecipe) -> float:
    """Linear warm-up, then cosine to 10% of the peak (qbench.resumable.schedule_factor)."""
    return schedule_factor(step, recipe.warmup, recipe.steps)


def save_state(out: Path, model, names, optimizer, generator, step: int, meta: dict) -> None:
    from safetensors.torch import save

    from qbench.atomic import atomic_write_bytes

    params = dict(model.named_parameters())
    tensors = {f"param/{n}": params[n].detach().cpu().contiguous() for n in names}
    for n in names:
        st = optimizer.state.get(params[n], {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"{key}/{n}"] = torch.as_tensor(st[key]).detach().cpu().reshape(-1 if key == "step" else st[key].shape).contiguous()
    tensors["generator"] = generator.get_state()
    atomic_write_bytes(out / STATE_FILE, save(tensors, metadata={STATE_KEY: json.dumps({**meta, "step": step})}))
    (out / STATE_META).unlink(missing_ok=True)  # an older run's second file: the metadata now holds it


STATE_KEY = "qbench_retrofit_state"


def read_state_meta(out: Path) -> dict:
    """The facts and step of the state in `out` (one line CheckpointError if it is not a
    whole state: unreadable, or an old-style state missing its .json half)."""
    from safetensors import safe_open

    from qbench.safefile import check_regular
    from qbench.zoo import CheckpointError

    path = out / STATE_FILE
    try:
        check_regular(path, "state")
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(STATE_KEY)
        if text is None:  # an old-style state: the step is in the second file, which must be there
            from qbench.safefile import read_text

            if not (out / STATE_META).exists():
                raise CheckpointError(f"{out} holds a partial retrofit state ({STATE_FILE} without {STATE_META}: "
                                      "a run stopped between its two writes); delete both to start over")
            text = read_text(out / STATE_META, "manifest")
        meta = json.loads(text)
        if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
            raise ValueError("no integer step")
        return meta
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable retrofit state ({' '.join(str(err).split())[:200]}); "
                              "delete it to start over") from None


def load_state(out: Path, model, names, optimizer, generator) -> int:
    from safetensors.torch import load_file

    from qbench.zoo import CheckpointError

    step = int(read_state_meta(out)["step"])
    try:
        tensors = load_file(str(out / STATE_FILE))
    except Exception as err:
        raise CheckpointError(f"{out / STATE_FILE} is not a readable retrofit state ({err}); delete it to start over") from err
    params = dict(model.named_parameters())
    missing = [n for n in names if f"param/{n}" not in tensors]
    if missing:
        raise CheckpointError(f"{out / STATE_FILE} lacks {missing[:3]}: a state of another recipe; delete it")
    with torch.no_grad():
        for n in names:
            params[n].copy_(tensors[f"param/{n}"])
            if f"exp_avg/{n}" in tensors:
                p = params[n]
                optimizer.state[p] = {"step": tensors[f"step/{n}"].reshape(()).float(),
                                      "exp_avg": tensors[f"exp_avg/{n}"].to(p.device),
                                      "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device)}
    generator.set_state(tensors["generator"])
    return step
