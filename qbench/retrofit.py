"""The retrofit: put an attention arm into a pretrained Llama-family model by a short
fine-tune, and store what changed as deltas on top of the base.

`retrofit(base, arm, recipe, seed, out)` loads the base (a zoo name such as `smollm2-135m`
or a checkpoint folder), adds the arm's parameters at their identity init
(`qbench.modeling.llama_arms`), and fine-tunes on the corpus's training split (BOS-prefixed
windows, the perplexity protocol's first token).  The data order depends on the seed only,
never on the arm, so the `softmax` control sees the same batches in the same order.

The trainable set is a recipe field (`trainable`):
  `arm`         the new parameters only (gates, sink logits); the control trains nothing;
  `arm+norms`   plus every RMSNorm weight (35k parameters in SmolLM2);
  `arm+layers:A-B`  plus every weight of decoder layers A..B (SmolLM2's massive activation
                is written by layer 11's down projection: 8-11 lets the fine-tune rewrite it).
Only trainable tensors are stored (`deltas.safetensors`, in the recipe's `save_dtype`),
with `retrofit.json` naming the base and its checkpoint hash; `load_retrofit` refuses a
base whose hash differs.  Resumable: `retrofit_state.safetensors` (trainable tensors,
AdamW moments, generator state) + `retrofit_state.json`; no pickle.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qbench.registry import closest

CONFIG_FILE = "retrofit.json"
DELTAS_FILE = "deltas.safetensors"
STATE_FILE = "retrofit_state.safetensors"
STATE_META = "retrofit_state.json"
LOG_FILE = "train_log.csv"
GATE_LOG = "gate_log.csv"


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
]}


def get_recipe(name: str, settings: dict | None = None) -> RetrofitRecipe:
    """A built-in recipe or a YAML file (`base:` a built-in, then any field), then `--set`."""
    if name in RECIPES:
        recipe = RECIPES[name]
    elif Path(name).is_file():
        import yaml

        data = yaml.safe_load(Path(name).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"recipe file {name} must be a mapping of recipe keys")
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
        current = fields[key]
        if key == "grad_clip":
            changed[key] = None if str(value).lower() in ("none", "0", "0.0") else float(value)
        elif isinstance(current, bool) or current is None:
            changed[key] = value
        elif isinstance(current, int):
            changed[key] = int(value)
        elif isinstance(current, float):
            changed[key] = float(value)
        else:
            changed[key] = str(value)
    recipe = replace(recipe, **changed)
    trainable_groups(recipe.trainable)  # validates
    if recipe.steps < 1 or recipe.batch_size < 1 or recipe.context < 2 or recipe.save_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"recipe {recipe.name}: steps, batch_size >= 1, context >= 2, save_dtype float32|bfloat16")
    return recipe


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
    from qbench.modeling.llama_arms import arm_parameter_names

    norms, layers = trainable_groups(spec)
    names = set(arm_parameter_names(model))
    n_layers = len(model.model.layers)
    if layers is not None and layers.stop > n_layers:
        raise ValueError(f"trainable {spec}: the model has {n_layers} layers (0-{n_layers - 1})")
    for name, _ in model.named_parameters():
        if norms and name.endswith("norm.weight"):
            names.add(name)
        found = re.match(r"model\.layers\.(\d+)\.", name)
        if layers is not None and found and int(found[1]) in layers:
            names.add(name)
    return sorted(names)


# -- data -------------------------------------------------------------------------------

class RetrofitData:
    """BOS-prefixed random windows of the corpus's training split, in the base's tokenizer;
    the first token is the perplexity protocol's (so training sees what evaluation sees)."""

    def __init__(self, tokenizer, corpus_spec: str, context: int, batch_size: int):
        from qbench.data import load_corpus
        from qbench.data.tokens import cached_split_ids
        from qbench.eval.perplexity import _bos_id

        corpus = load_corpus(corpus_spec)
        self.ids = cached_split_ids(corpus, "train", tokenizer)
        self.bos = _bos_id(tokenizer)
        self.context, self.batch_size = context, batch_size
        self.info = {"corpus": corpus_spec, "split": "train", "hashes": {"train": corpus.split_hash("train")},
                     "train_tokens": int(len(self.ids)), "first_token_id": self.bos}

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        from qbench.data.tokens import random_windows

        return random_windows(self.ids, self.batch_size, self.context, self.bos, generator)


# -- optimiser and state ----------------------------------------------------------------

def _optimizer(model, names: list[str], recipe: RetrofitRecipe) -> torch.optim.AdamW:
    """Gates at `lr`, base weights at `base_lr` with weight decay, sink logits at `sink_lr`
    with eps 1e-30: a sink logit's gradient scales with exp(s_h) (about 1e-15 at the
    identity init), so with Adam's default eps its update would vanish; with a tiny eps the
    update is sign-like and the logit can climb to where the sink matters."""
    params = dict(model.named_parameters())
    gates = [params[n] for n in names if ".qbench_gate." in n]
    sinks = [params[n] for n in names if n.endswith(".sink_logit")]
    base = [params[n] for n in names if ".qbench_gate." not in n and not n.endswith(".sink_logit")]
    groups = [{"params": gates, "lr": recipe.lr, "weight_decay": 0.0, "name": "gates"},
              {"params": sinks, "lr": recipe.sink_lr, "weight_decay": 0.0, "eps": 1e-30, "name": "sinks"},
              {"params": base, "lr": recipe.base_lr, "weight_decay": recipe.weight_decay, "name": "base"}]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))


def _lr_factor(step: int, recipe: RetrofitRecipe) -> float:
    """Linear warm-up, then cosine to 10% of the peak."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save_state(out: Path, model, names, optimizer, generator, step: int, meta: dict) -> None:
    from safetensors.torch import save

    from qbench.atomic import atomic_write_bytes, atomic_write_text

    params = dict(model.named_parameters())
    tensors = {f"param/{n}": params[n].detach().cpu().contiguous() for n in names}
    for n in names:
        st = optimizer.state.get(params[n], {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"{key}/{n}"] = torch.as_tensor(st[key]).detach().cpu().reshape(-1 if key == "step" else st[key].shape).contiguous()
    tensors["generator"] = generator.get_state()
    atomic_write_bytes(out / STATE_FILE, save(tensors))
    atomic_write_text(out / STATE_META, json.dumps({**meta, "step": step}, indent=1))


def _load_state(out: Path, model, names, optimizer, generator) -> int:
    from safetensors.torch import load_file

    from qbench.zoo import CheckpointError

    try:
        tensors = load_file(str(out / STATE_FILE))
        step = int(json.loads((out / STATE_META).read_text())["step"])
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


# -- the fine-tune ----------------------------------------------------------------------

@torch.no_grad()
def gate_snapshot(model, batch: torch.Tensor) -> dict:
    """Mean gate at the first token vs the other tokens, and the sink logits, over layers."""
    from qbench.modeling.model import attention_layers

    seen: dict[int, torch.Tensor] = {}

    class _Gates:
        first_column_only = True

        def scores(self, x): return x
        def probs(self, x): return x
        def context(self, x): return x
        def first_column(self, x): pass
        def gate(self, layer, g): seen[layer] = g.detach().float()

    layers = attention_layers(model)
    for _, m in layers:
        m.qbench_hooks = _Gates()
    try:
        model(batch)
    finally:
        for _, m in layers:
            m.qbench_hooks = None
    out = {}
    if seen:
        out["gate_bos"] = float(torch.stack([g[..., 0, :].mean() for g in seen.values()]).mean())
        out["gate_others"] = float(torch.stack([g[..., 1:, :].mean() for g in seen.values()]).mean())
        out["gate_bos_min_layer"] = float(min(g[..., 0, :].mean() for g in seen.values()))
    sinks = [m.sink_logit for _, m in layers if hasattr(m, "sink_logit")]
    if sinks:
        out["sink_logit_max"] = float(torch.stack([s.max() for s in sinks]).max())
    return out


def retrofit(base: str, arm: str, recipe: RetrofitRecipe, seed: int, out: Path, *, threads: int | None = None,
             device: str = "cpu", amp: str | None = None, progress: bool = True) -> dict:
    """Fine-tunes `arm` into `base` by `recipe`; resumable; returns the retrofit.json facts."""
    from qbench.atomic import atomic_write_text
    from qbench.modeling.llama_arms import install_arm
    from qbench.results import library_versions
    from qbench.zoo import resolve_model

    if threads:
        torch.set_num_threads(threads)
    if amp not in (None, "bf16"):
        raise ValueError(f"--amp {amp!r}: only bf16 autocast is supported")
    if amp and device == "cpu":
        raise ValueError("--amp bf16 is the GPU recipe; the CPU path trains in float32")
    ref = resolve_model(base)
    loaded = ref.load()
    model = loaded.model
    install_arm(model, arm)
    names = trainable_names(model, recipe.trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    model.to(device).train()
    data = RetrofitData(loaded.tokenizer, recipe.corpus, recipe.context, recipe.batch_size)
    generator = torch.Generator().manual_seed(seed)  # data order: the seed's, whatever the arm
    probe_batch = data.batch(torch.Generator().manual_seed(1234))[:2].to(device)  # fixed windows for the gate log
    optimizer = _optimizer(model, names, recipe) if names else None
    out.mkdir(parents=True, exist_ok=True)
    meta = {"base": base, "base_checkpoint_hash": ref.checkpoint_hash, "arm": arm, "seed": seed,
            "recipe": recipe.to_dict(), "trainable": names}
    start = 0
    if (out / STATE_FILE).exists():
        old = json.loads((out / STATE_META).read_text())
        def what(facts):  # prose (the recipe's description) never blocks a resume
            return {**facts, "recipe": {k: v for k, v in (facts.get("recipe") or {}).items() if k != "description"}}

        differ = [k for k in ("base", "base_checkpoint_hash", "arm", "seed", "recipe") if what(old).get(k) != what(meta)[k]]
        if differ:
            raise ValueError(f"{out} holds a retrofit with other {', '.join(differ)}; choose another --out")
        start = _load_state(out, model, names, optimizer, generator) if optimizer else int(old["step"])
    elif (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} already holds a finished retrofit; choose another --out")
    log_path, gate_path = out / LOG_FILE, out / GATE_LOG
    for path in (log_path, gate_path):  # rows past the resumed step are written again
        _truncate(path, start)
    began, tokens = time.time(), 0
    # a chained digest of every batch drawn: equal for two runs iff they saw the same data in the same order
    order = json.loads((out / STATE_META).read_text()).get("data_order", "") if start else ""
    bar = tqdm(range(start, recipe.steps), desc=f"retrofit {arm} s{seed}", disable=not progress,
               initial=start, total=recipe.steps)
    for step in bar:
        x = data.batch(generator)
        order = hashlib.sha256(order.encode() + x.numpy().tobytes()).hexdigest()
        x = x.to(device)
        if step % recipe.log_every == 0:
            model.eval()
            snap = gate_snapshot(model, probe_batch)
            model.train()
            _append(gate_path, {"step": step, **snap})
        if optimizer is None:  # the control of the gates-only recipe: nothing to train, same data
            continue
        for group in optimizer.param_groups:
            peak = {"gates": recipe.lr, "sinks": recipe.sink_lr, "base": recipe.base_lr}[group["name"]]
            group["lr"] = peak * _lr_factor(step, recipe)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.grad_clip)
        optimizer.step()
        tokens += x.numel()
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            _append(log_path, {"step": step, "loss": round(loss.item(), 5),
                               "tokens_per_s": round(tokens / max(1e-9, time.time() - began), 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % recipe.save_every == 0 and step + 1 < recipe.steps:
            _save_state(out, model, names, optimizer, generator, step + 1, {**meta, "data_order": order})
    model.eval()
    _append(gate_path, {"step": recipe.steps, **gate_snapshot(model, probe_batch)})
    facts = {**meta, "steps_done": recipe.steps, "data": data.info, "data_order_sha256": order,
             "device": device, "amp": amp,
             "threads": torch.get_num_threads(), "seconds": round(time.time() - began, 1),
             "library_versions": library_versions()}
    save_deltas(model, names, out, recipe.save_dtype)
    atomic_write_text(out / CONFIG_FILE, json.dumps(facts, indent=1, default=str))
    for path in (out / STATE_FILE, out / STATE_META):
        path.unlink(missing_ok=True)
    return facts


def _truncate(path: Path, step: int) -> None:
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < step]
    from qbench.atomic import atomic_write_text

    atomic_write_text(path, "".join(",".join(r) + "\n" for r in kept))


def _append(path: Path, row: dict) -> None:
    fields = list(row)
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            fields = next(csv.reader(f), fields)
        fields += [k for k in row if k not in fields]
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


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


def _register() -> None:
    from qbench.zoo import register_folder_kind

    register_folder_kind(CONFIG_FILE, retrofit_ref)


_register()
