"""Training recipes: the presets, `--set` and YAML recipe files, and the learning-rate
schedule."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qbench.resumable import parse_set_pairs, read_recipe_yaml, schedule_factor
from qbench.suggest import closest


@dataclass(frozen=True)
class Preset:
    name: str
    task: str  # "lm" (next token on a corpus) or "bigram_backcopy"
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    context: int
    vocab_size: int  # BPE vocab for "lm"; ignored for bigram_backcopy (characters)
    batch_size: int
    steps: int
    lr: float
    warmup: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float | None  # max gradient norm; None or <= 0: no clipping
    eval_every: int
    save_every: int
    description: str
    schedule: str = "cosine"  # "cosine" (to 10% of the peak after warm-up) or "constant" (after warm-up)
    # Bigram-Backcopy draws: "multinomial" (per position) or "inverse_cdf" (same law, another
    # stream, ~20x faster: the GPU presets' data would otherwise bound a run at ~8 steps/s)
    sampler: str = "multinomial"

    def to_dict(self) -> dict:
        return asdict(self)


# Fields added to Preset after checkpoints were trained: their value in those recipes (a
# saved recipe without the field ran with this), so old train states still resume.
LEGACY_DEFAULTS = {"schedule": "cosine", "sampler": "multinomial"}
SCHEDULES = ("cosine", "constant")
SAMPLERS = ("multinomial", "inverse_cdf")
# `--set` keys that are not recipe fields: options of the arm (QBenchConfig) and the corpus.
ARM_OPTIONS = {"gate_init": float, "gate_granularity": str, "clip_alpha": float}


def _guo(name: str, *, n_layer: int, context: int, batch_size: int, steps: int, eval_every: int,
         save_every: int, description: str, sampler: str = "inverse_cdf") -> Preset:
    """Guo et al. 2024's Bigram-Backcopy recipe (see the comment above the bb-guo presets):
    1 head of width 256, AdamW lr 3e-4 constant, betas (0.9, 0.99), weight decay 1e-4, no
    warm-up, no clipping; the presets differ in depth, context, batch, steps and logging."""
    return Preset(name, "bigram_backcopy", n_layer=n_layer, n_head=1, d_model=256, d_ff=1024, context=context,
                  vocab_size=0, batch_size=batch_size, steps=steps, lr=3e-4, warmup=0, weight_decay=1e-4,
                  betas=(0.9, 0.99), grad_clip=None, eval_every=eval_every, save_every=save_every,
                  schedule="constant", sampler=sampler, description=description)


PRESETS = {
    p.name: p
    for p in [
        Preset("bb", "bigram_backcopy", n_layer=1, n_head=1, d_model=256, d_ff=1024, context=64,
               vocab_size=0, batch_size=128, steps=1000, lr=3e-4, warmup=100, weight_decay=1e-4,
               betas=(0.9, 0.99), grad_clip=1.0, eval_every=250, save_every=250,
               description="Bigram-Backcopy (Guo et al.): 1 layer, 1 head, width 256; minutes on CPU"),
        Preset("tiny", "lm", n_layer=4, n_head=4, d_model=256, d_ff=1024, context=256,
               vocab_size=4096, batch_size=16, steps=1000, lr=1e-3, warmup=100, weight_decay=0.1,
               betas=(0.9, 0.95), grad_clip=1.0, eval_every=250, save_every=100,
               description="5.3M parameters, context 256, 4.1M tokens; ~25 minutes on 2 CPU cores"),
        Preset("small", "lm", n_layer=4, n_head=4, d_model=256, d_ff=1024, context=256,
               vocab_size=4096, batch_size=256, steps=1000, lr=1e-3, warmup=100, weight_decay=0.1,
               betas=(0.9, 0.95), grad_clip=1.0, eval_every=500, save_every=500,
               description="tiny's architecture and tokenizer with 16x its batch (16x the tokens, 65.5M); "
                           "a GPU recipe: bf16 autocast, weights stored bf16 (small-*-3k: --steps 3000)"),
        # Guo et al. 2024's Bigram-Backcopy recipe (REFERENCE.md section 4), checked against
        # their released scripts (github.com/GuoTianYu2000/Active-Dormant-Attention, BBM/):
        # AdamW lr 3e-4 constant, betas (0.9, 0.99), weight decay 1e-4, batch 512, no warm-up,
        # no clipping, 1 head of width 256, k = 3 triggers; 10,000 steps (dynamics.sh, 1 and
        # 3 layers); the 3-layer long run 100,000 steps (3L-dynamics.sh); sequence length 256
        # (DataArgs.seq_length, which no script overrides).  Differences, named in each
        # description: context 64 in bb-guo/bb3-guo (256 in bb-guo-256/bb3-guo-long); weight
        # decay on matrices only (theirs: every parameter); our character corpus (sotu) and
        # model (QBenchForCausalLM), not theirs; the inverse-CDF sampler (same law).
        _guo("bb-guo", n_layer=1, context=64, batch_size=512, steps=10000, eval_every=500, save_every=500,
             description="Guo et al.'s 1-layer Bigram-Backcopy recipe (batch 512, 10,000 steps, constant 3e-4) "
                         "at context 64 (theirs 256), decay on matrices only; a GPU recipe"),
        _guo("bb3-guo", n_layer=3, context=64, batch_size=512, steps=10000, eval_every=500, save_every=500,
             description="bb-guo with 3 layers: Guo et al.'s 10,000-step 3-layer run at context 64 (theirs 256); "
                         "their residual-peak run is 100,000 steps (bb3-guo-long)"),
        _guo("bb-guo-256", n_layer=1, context=256, batch_size=512, steps=10000, eval_every=500, save_every=500,
             description="bb-guo at Guo et al.'s sequence length 256 (decay on matrices only); resumable "
                         "across GPU budgets"),
        _guo("bb3-guo-long", n_layer=3, context=256, batch_size=512, steps=100000, eval_every=2500, save_every=500,
             description="Guo et al.'s 3-layer residual-peak run: 100,000 steps at length 256 (decay on matrices "
                         "only); many GPU budgets, resumed from returned safetensors state"),
        # The same recipe at a quarter of the batch and a quarter of the steps (1/16 of the
        # tokens), sized for one CPU thread in the background: ~50 min (1 layer) and ~2.4 h
        # (3 layers) at the ~7,000 tokens/s REFERENCE.md measured for the 1-layer model.  They
        # keep the multinomial sampler their committed checkpoints' recipes record.
        _guo("bb-guo-cpu", n_layer=1, context=64, batch_size=128, steps=2500, eval_every=250, save_every=250,
             sampler="multinomial",
             description="bb-guo at batch 128 and 2,500 steps (1/16 of its tokens): under 1 h on one CPU thread"),
        _guo("bb3-guo-cpu", n_layer=3, context=64, batch_size=128, steps=2400, eval_every=200, save_every=200,
             sampler="multinomial",
             description="bb3-guo at batch 128 and 2,400 steps: under 2.5 h on one CPU thread"),
    ]
}

def get_preset(name: str) -> Preset:
    """A built-in preset by name, or a YAML recipe file (`base:` an optional built-in to
    start from, then any Preset field)."""
    if name not in PRESETS and (name.endswith((".yaml", ".yml")) or Path(name).exists()):
        return load_recipe_file(Path(name))
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}{closest(name, PRESETS)} (or give a recipe .yaml file)")
    return PRESETS[name]


def _coerce(key: str, value, current):
    """A --set / YAML value converted to the type of the field it replaces."""
    if key == "betas":
        parts = value if isinstance(value, (list, tuple)) else str(value).strip("()[] ").split(",")
        if len(parts) != 2:
            raise ValueError(f"betas must be two numbers, e.g. betas=0.9,0.99; got {value!r}")
        return (float(parts[0]), float(parts[1]))
    if key == "grad_clip":
        if value is None or str(value).lower() in ("none", "off", "false", "0", "0.0"):
            return None
        return float(value)
    if key in ("schedule", "sampler"):
        choices = SCHEDULES if key == "schedule" else SAMPLERS
        if value not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {value!r}")
        return value
    if isinstance(current, bool) or current is None:
        return value
    if isinstance(current, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return int(float(value)) if isinstance(value, str) and value.replace(".", "", 1).isdigit() else int(value)
    if isinstance(current, float):
        return float(value)
    return str(value)


def with_settings(preset: Preset, settings: dict) -> Preset:
    """`preset` with fields replaced (values converted and checked); unknown keys are errors."""
    fields = preset.to_dict()
    changed = {}
    for key, value in settings.items():
        if key not in fields:
            raise ValueError(f"unknown recipe key {key!r}{closest(key, list(fields) + list(ARM_OPTIONS))}")
        try:
            changed[key] = _coerce(key, value, fields[key])
        except (TypeError, ValueError) as err:
            raise ValueError(f"recipe key {key}: {err}") from None
    result = replace(preset, **changed)
    if result.steps < 1 or result.batch_size < 1 or result.context < 2 or result.lr <= 0 or result.warmup < 0:
        raise ValueError(f"recipe {result.name}: steps, batch_size >= 1, context >= 2, lr > 0, warmup >= 0")
    return result


def load_recipe_file(path: Path) -> Preset:
    if not path.exists():
        raise ValueError(f"recipe file {path} does not exist")
    data = read_recipe_yaml(path)
    base = get_preset(str(data.pop("base", "tiny")))
    return with_settings(replace(base, name=str(data.pop("name", path.stem)),
                                 description=str(data.pop("description", f"recipe file {path.name}"))), data)


def parse_settings(pairs: list[str]) -> tuple[dict, dict]:
    """`--set key=value` pairs -> (recipe fields, arm options and corpus)."""
    recipe, arm = {}, {}
    for key, value in parse_set_pairs(pairs).items():
        if key in ARM_OPTIONS:
            try:
                arm[key] = ARM_OPTIONS[key](value)
            except ValueError:
                raise ValueError(f"--set {key}: {value!r} is not a {ARM_OPTIONS[key].__name__}") from None
        elif key == "corpus":
            arm[key] = value
        else:
            recipe[key] = value
    return recipe, arm


def normalise_recipe(recipe: dict) -> dict:
    """A saved recipe with the fields added since it was written filled in as they ran."""
    recipe = dict(recipe)
    preset = {**LEGACY_DEFAULTS, **recipe.get("preset", {})}
    if isinstance(preset.get("betas"), list):
        preset["betas"] = tuple(preset["betas"])
    recipe["preset"] = preset
    recipe.setdefault("arm_options", {})
    return recipe


def learning_rate(step: int, preset: Preset) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak ("cosine") or the peak held
    ("constant"): qbench.resumable.schedule_factor of the peak."""
    if step < preset.warmup:  # (lr * (step + 1)) / warmup: the rounding every checkpoint was trained with
        return preset.lr * (step + 1) / preset.warmup
    return preset.lr * schedule_factor(step, preset.warmup, preset.steps, preset.schedule)
