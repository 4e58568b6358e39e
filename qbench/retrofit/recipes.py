"""Retrofit recipes (built-in, YAML files, `--set`) and the trainable set they name."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from qbench.resumable import read_recipe_yaml
from qbench.suggest import closest


@dataclass(frozen=True)
class RetrofitRecipe:
    name: str
    trainable: str  # "arm" | "arm+norms" | "arm+layers:A-B"
    context: int
    batch_size: int
    steps: int
    lr: float  # the arm's gates
    base_lr: float  # unfrozen base weights (norms, layers)
    sink_lr: float  # sink logits (sign-like updates: see `_optimizer`)
    warmup: int
    weight_decay: float  # base weights only; gates and sink logits have none
    grad_clip: float | None
    save_every: int
    log_every: int
    save_dtype: str  # "float32" | "bfloat16"
    description: str
    corpus: str = "sotu"
    clamp_layer: int = -1  # H2: cap this layer's MLP output at the first position (-1: no clamp)
    clamp_cap: float = 0.0  # the cap C; 0 = chosen from the data (qbench.retrofit.clamp.auto_cap)
    snapshots: str = ""  # token counts (e.g. "0,100000,300000") at which a loadable copy is written

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES = {r.name: r for r in [
    RetrofitRecipe("retrofit-pilot", "arm", context=256, batch_size=4, steps=60, lr=1e-2, base_lr=0.0,
                   sink_lr=0.1, warmup=5, weight_decay=0.0, grad_clip=1.0, save_every=10, log_every=5,
                   save_dtype="float32",
                   description="CPU pilot: the arm's parameters only (gates / sink logits), 60 steps of 4 x 256 "
                               "tokens (61k tokens), about 20 minutes per arm on one busy thread; shows the gates' "
                               "dynamics and checks the pipeline end to end, not the experiment"),
    RetrofitRecipe("retrofit-gpu", "arm+layers:8-11", context=512, batch_size=32, steps=1000, lr=1e-2, base_lr=2e-5,
                   sink_lr=0.1, warmup=50, weight_decay=0.0, grad_clip=1.0, save_every=250, log_every=10,
                   save_dtype="bfloat16",
                   description="GPU recipe (bf16 autocast): the arm plus decoder layers 8-11 (where the massive "
                               "activation is written), 16.4M tokens; deltas about 28 MB in bf16. Not run yet"),
    RetrofitRecipe("retrofit-cpu-h1", "arm+norms", context=256, batch_size=4, steps=98, lr=1e-2, base_lr=1e-3,
                   sink_lr=0.1, warmup=5, weight_decay=0.0, grad_clip=1.0, save_every=10, log_every=7,
                   save_dtype="float32", snapshots="25600,50176",
                   description="H1 on the CPU (run with --amp bf16): the arm plus every norm weight, the same "
                               "norms for the softmax control, so the control trains; 98 steps of 4 x 256 tokens "
                               "(0.1M), with loadable snapshots at 25k and 50k tokens (the dose)"),
    RetrofitRecipe("retrofit-cpu-h2", "arm+norms", context=256, batch_size=4, steps=98, lr=1e-2, base_lr=1e-3,
                   sink_lr=0.1, warmup=5, weight_decay=0.0, grad_clip=1.0, save_every=10, log_every=7,
                   save_dtype="float32", snapshots="0,25600,50176", clamp_layer=11, clamp_cap=0.0,
                   description="H2, clamp and repair, on the CPU (run with --amp bf16): layer 11's MLP output "
                               "capped at the first position at the largest |value| it writes at other positions; "
                               "the arm plus every norm weight repair it (the control: the norms alone); 0.1M "
                               "tokens with snapshots at 0 (clamped, unrepaired), 25k and 50k"),
]}


def get_recipe(name: str, settings: dict | None = None) -> RetrofitRecipe:
    """A built-in recipe or a YAML file (`base:` a built-in, then any field), then `--set`."""
    if name in RECIPES:
        recipe = RECIPES[name]
    elif Path(name).exists():
        data = read_recipe_yaml(name)
        base = RECIPES.get(str(data.pop("base", "retrofit-pilot")))
        if base is None:
            raise ValueError(f"recipe file {name}: unknown base{closest(name, RECIPES)}")
        recipe = replace(base, name=Path(name).stem)
        settings = {**data, **(settings or {})}
    else:
        raise ValueError(f"unknown retrofit recipe {name!r}{closest(name, RECIPES)} (or give a .yaml file)")
    fields = recipe.to_dict()
    changed = {}
    for key, value in (settings or {}).items():
        if key not in fields:
            raise ValueError(f"unknown retrofit recipe key {key!r}{closest(key, fields)}")
        try:
            changed[key] = _coerce(key, value, fields[key])
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"retrofit recipe key {key}: {str(value)[:80]!r} is not a valid "
                             f"{type(fields[key]).__name__}") from None
    recipe = replace(recipe, **changed)
    trainable_groups(recipe.trainable)  # validates
    snapshot_steps(recipe)  # validates
    if recipe.steps < 1 or recipe.batch_size < 1 or recipe.context < 2 or recipe.save_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"recipe {recipe.name}: steps, batch_size >= 1, context >= 2, save_dtype float32|bfloat16")
    return recipe


def _coerce(key: str, value, current):
    """A --set / YAML value as the type of the field it replaces (1e8 is an integer too)."""
    if isinstance(value, (list, dict)):
        raise TypeError(key)
    if key == "grad_clip":
        return None if str(value).lower() in ("none", "0", "0.0") else float(value)
    if isinstance(current, bool) or current is None:
        return value
    if isinstance(current, int):
        number = float(value) if isinstance(value, str) and not value.strip().lstrip("+-").isdigit() else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(key)
        return int(number)
    if isinstance(current, float):
        return float(value)
    return str(value)


def trainable_groups(spec: str) -> tuple[bool, range | None]:
    """'arm' | 'arm+norms' | 'arm+layers:A-B' -> (norms, layers)."""
    if spec == "arm":
        return False, None
    if spec == "arm+norms":
        return True, None
    found = re.fullmatch(r"arm\+layers:(\d+)-(\d+)", spec)
    if found and int(found[1]) <= int(found[2]):
        return False, range(int(found[1]), int(found[2]) + 1)
    raise ValueError(f"trainable {spec!r}: use arm, arm+norms or arm+layers:A-B")


def trainable_names(model: torch.nn.Module, spec: str) -> list[str]:
    from qbench.modeling.families import decoder_layers
    from qbench.modeling.llama_arms import arm_parameter_names

    norms, layers = trainable_groups(spec)
    names = set(arm_parameter_names(model))
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    if layers is not None and layers.stop > n_layers:
        raise ValueError(f"trainable {spec}: the model has {n_layers} layers (0-{n_layers - 1})")
    name_of = {id(p): name for name, p in model.named_parameters()}
    for name in name_of.values():
        if norms and name.endswith("norm.weight"):
            names.add(name)
    for index in layers if layers is not None else ():
        names.update(name_of[id(p)] for p in blocks[index].parameters())
    return sorted(names)


def snapshot_steps(recipe: RetrofitRecipe) -> dict[int, int]:
    """{step: tokens} of the recipe's snapshots (tokens rounded to whole steps; step 0 is the
    model before any update), each within the run."""
    per_step = recipe.batch_size * recipe.context
    out = {}
    for part in (p.strip() for p in recipe.snapshots.split(",") if p.strip()):
        try:
            tokens = int(float(part))
        except ValueError:
            raise ValueError(f"recipe {recipe.name}: snapshots {recipe.snapshots!r} must be token counts") from None
        step = round(tokens / per_step)
        if not 0 <= step < recipe.steps:
            raise ValueError(f"recipe {recipe.name}: snapshot at {tokens} tokens is outside the run's "
                             f"{recipe.steps * per_step} tokens")
        out[step] = step * per_step
    names = [snapshot_suffix(t) for t in out.values()]
    if len(set(names)) < len(names):
        raise ValueError(f"recipe {recipe.name}: snapshots {recipe.snapshots!r} give folders of one name "
                         f"({', '.join(names)}); choose counts that differ by >= 1000 tokens")
    return out


def snapshot_suffix(tokens: int) -> str:
    """The snapshot folder's suffix: `-t25k` for 25,600 tokens (whole thousands)."""
    return f"-t{tokens // 1000}k"
