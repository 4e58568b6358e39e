"""The fine-tune: the arm installed into the base, the trainable set trained on the
corpus, the loss and gate logs written as it goes, the deltas stored at the end."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qbench.resumable import append_row, changed_keys, optimizer_step, run_folder, truncate_log, use_threads
from qbench.retrofit.data import RetrofitData
from qbench.retrofit.deltas import CONFIG_FILE, save_deltas
from qbench.retrofit.recipes import RetrofitRecipe, snapshot_steps, snapshot_suffix, trainable_names
from qbench.retrofit.state import (STATE_FILE, STATE_META, arm_parameters, build_optimizer, group_peak_lr, load_state,
                                   lr_factor, read_state_meta, save_state)

LOG_FILE = "train_log.csv"
GATE_LOG = "gate_log.csv"


@torch.no_grad()
def gate_snapshot(model, batch: torch.Tensor) -> dict:
    """Mean gate at the first token vs the other tokens, and the sink logits, over layers."""
    from qbench.modeling.hooks import ObserverHooks, observing

    seen: dict[int, torch.Tensor] = {}

    class _Gates(ObserverHooks):
        def observe_gate(self, layer: int, g: torch.Tensor) -> None:
            seen[layer] = g.detach().float()

    with observing(model, lambda index, module, inner: _Gates(inner, first_column_only=True)) as layers:
        model(batch)
    out = {}
    if seen:
        out["gate_bos"] = float(torch.stack([g[..., 0, :].mean() for g in seen.values()]).mean())
        out["gate_others"] = float(torch.stack([g[..., 1:, :].mean() for g in seen.values()]).mean())
        out["gate_bos_min_layer"] = float(min(g[..., 0, :].mean() for g in seen.values()))
    for name in arm_parameters():  # each declared arm parameter's largest value (sink logits)
        values = [getattr(m, name) for _, m in layers if isinstance(getattr(m, name, None), torch.Tensor)]
        if values:
            out[f"{name}_max"] = float(torch.stack([v.max() for v in values]).max())
    return out


def retrofit(base: str, arm: str, recipe: RetrofitRecipe, seed: int, out: Path, **options) -> dict:
    """Fine-tunes `arm` into `base` by `recipe`; resumable; returns the retrofit.json facts.
    One writer per --out: the folder's lock (qbench.resumable.run_folder) is held throughout."""
    with run_folder(out, "retrofit") as out:
        return _retrofit(base, arm, recipe, seed, out, **options)


def _retrofit(base: str, arm: str, recipe: RetrofitRecipe, seed: int, out: Path, *, threads: int | None = None,
              device: str = "cpu", amp: str | None = None, progress: bool = True) -> dict:
    from qbench.atomic import atomic_write_text
    from qbench.modeling.llama_arms import install_arm
    from qbench.results import library_versions
    from qbench.zoo import resolve_model

    use_threads(threads)
    if amp not in (None, "bf16"):
        raise ValueError(f"--amp {amp!r}: only bf16 autocast is supported")
    if amp and device == "cpu":
        cpu_bf16_units()  # one line where the CPU has none
    old = _saved_state(out)  # before any loading: a finished or partial --out is one line at once
    ref = resolve_model(base)
    loaded = ref.load()
    model = loaded.model
    install_arm(model, arm)
    data = RetrofitData(loaded.tokenizer, recipe.corpus, recipe.context, recipe.batch_size)
    clamp = _install_clamp(model, recipe, data)
    names = trainable_names(model, recipe.trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    check_retrofit_memory(model, names, recipe, torch.cuda.mem_get_info(torch.device(device))[0]
                          if device.startswith("cuda") and torch.cuda.is_available() else None)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)  # data order: the seed's, whatever the arm
    probe_batch = data.batch(torch.Generator().manual_seed(1234))[:2].to(device)  # fixed windows for the gate log
    optimizer = build_optimizer(model, names, recipe) if names else None
    out.mkdir(parents=True, exist_ok=True)
    meta = {"base": base, "base_checkpoint_hash": ref.checkpoint_hash, "arm": arm, "seed": seed,
            "recipe": recipe.to_dict(), "trainable": names, "amp": amp, "clamp": clamp}
    start = 0
    if old:
        def what(facts):  # prose (the recipe's description) never blocks a resume
            return {**facts, "recipe": {k: v for k, v in (facts.get("recipe") or {}).items() if k != "description"}}

        differ = changed_keys(what(old), what(meta), ("base", "base_checkpoint_hash", "arm", "seed", "recipe", "amp",
                                                       "clamp"))
        if differ:
            raise ValueError(f"{out} holds a retrofit with other {', '.join(differ)}; choose another --out")
        start = load_state(out, model, names, optimizer, generator) if optimizer else int(old["step"])
    log_path, gate_path = out / LOG_FILE, out / GATE_LOG
    for path in (log_path, gate_path):  # rows from the resumed step on are written again
        truncate_log(path, start - 1)
    began, tokens = time.time(), 0
    # a chained digest of every batch drawn: equal for two runs iff they saw the same data in the same order
    order = str(old.get("data_order", "")) if start else ""
    bar = tqdm(range(start, recipe.steps), desc=f"retrofit {arm} s{seed}", disable=not progress,
               initial=start, total=recipe.steps)
    snapshots = snapshot_steps(recipe)
    for step in bar:
        if step in snapshots:
            _snapshot(model, names, out, recipe, {**meta, "data": data.info, "data_order_sha256": order, "device": device},
                      step, snapshots[step])
        x = data.batch(generator)
        order = hashlib.sha256(order.encode() + x.numpy().tobytes()).hexdigest()
        x = x.to(device)
        if step % recipe.log_every == 0:
            model.eval()
            snap = gate_snapshot(model, probe_batch)
            model.train()
            append_row(gate_path, {"step": step, **snap})
        if optimizer is None:  # the control of the gates-only recipe: nothing to train, same data
            continue
        for group in optimizer.param_groups:
            peak = group_peak_lr(group["name"], recipe)
            group["lr"] = peak * lr_factor(step, recipe)
        loss = optimizer_step(model, optimizer, x, device=device, amp=amp, grad_clip=recipe.grad_clip,
                              check_finite=False)
        tokens += x.numel()
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            append_row(log_path, {"step": step, "loss": round(loss.item(), 5),
                               "tokens_per_s": round(tokens / max(1e-9, time.time() - began), 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % recipe.save_every == 0 and step + 1 < recipe.steps:
            save_state(out, model, names, optimizer, generator, step + 1, {**meta, "data_order": order})
    model.eval()
    append_row(gate_path, {"step": recipe.steps, **gate_snapshot(model, probe_batch)})
    facts = {**meta, "steps_done": recipe.steps, "tokens_done": recipe.steps * recipe.batch_size * recipe.context,
             "data": data.info, "data_order_sha256": order, "device": device, "autocast": _autocast_facts(amp, device),
             "threads": torch.get_num_threads(), "seconds": round(time.time() - began, 1),
             "library_versions": library_versions()}
    save_deltas(model, names, out, recipe.save_dtype)
    atomic_write_text(out / CONFIG_FILE, json.dumps(facts, indent=1, default=str))
    for path in (out / STATE_FILE, out / STATE_META):
        path.unlink(missing_ok=True)
    return facts


def cpu_bf16_units() -> str:
    """The CPU's bfloat16 units (AMX-BF16 or AVX-512 BF16) by the kernel's flags; a
    ValueError (one line) where it has neither: bf16 autocast would then be emulated,
    slower than float32."""
    from qbench.quant.int8_gemm import cpu_signature

    flags = cpu_signature()["flags"]
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if not units:
        raise ValueError("--amp bf16 on the CPU needs bfloat16 units (AMX-BF16 or AVX-512 BF16); this CPU has "
                         "neither: train in float32 (--amp none)")
    return "+".join(units)


def _autocast_facts(amp: str | None, device: str) -> dict:
    if not amp:
        return {"dtype": "float32"}
    facts = {"dtype": "bfloat16 autocast", "master_weights": "float32", "device_type": torch.device(device).type}
    if facts["device_type"] == "cpu":
        facts["cpu_bf16_units"] = cpu_bf16_units()
    return facts


def _install_clamp(model, recipe: RetrofitRecipe, data: RetrofitData) -> dict | None:
    """The recipe's clamp installed before training (and recorded), or None. An automatic cap
    is measured on 8 fixed training windows (generator seed 4321, whatever the run's seed)."""
    if recipe.clamp_layer < 0:
        return None
    from qbench.retrofit.clamp import auto_cap, install_clamp

    chosen = "recipe"
    cap = recipe.clamp_cap
    if cap <= 0:
        windows = torch.cat([data.batch(torch.Generator().manual_seed(4321)) for _ in range(2)])
        model.eval()
        cap = auto_cap(model, recipe.clamp_layer, windows)
        chosen = f"max |MLP output| of layer {recipe.clamp_layer} at non-first positions of {len(windows)} training windows"
    install_clamp(model, recipe.clamp_layer, cap)
    return {"layer": recipe.clamp_layer, "site": "MLP output (down projection), first position", "cap": cap,
            "chosen_by": chosen}


def _snapshot(model, names, out: Path, recipe: RetrofitRecipe, meta: dict, step: int, tokens: int) -> None:
    """A loadable copy of the run at `step` (the dose ladder): the folder `<out>-t<k>k` beside
    `out`, written once (a resumed run keeps it)."""
    from qbench.atomic import atomic_write_text

    folder = out.parent / f"{out.name}{snapshot_suffix(tokens)}"
    if (folder / CONFIG_FILE).exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    save_deltas(model, names, folder, recipe.save_dtype)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(
        {**meta, "steps_done": step, "tokens_done": tokens, "snapshot_of": out.name,
         "autocast": _autocast_facts(meta.get("amp"), meta.get("device", "cpu"))}, indent=1, default=str))
    model.train(was_training)


def check_retrofit_memory(model, names: list[str], recipe: RetrofitRecipe, available: int | None = None) -> None:
    """Before any batch is drawn: a lower bound of what one step allocates (the logits and
    their gradient, 8 bytes per token and vocabulary entry; the trainable tensors' gradient
    and AdamW moments, 12 bytes each) against the memory available: `--set batch_size=1e8`
    is one line (exit 2), not a MemoryError traceback."""
    from qbench.validate import check_memory

    params = dict(model.named_parameters())
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    need = 8 * recipe.batch_size * recipe.context * vocab + 12 * sum(params[n].numel() for n in names)
    check_memory(need, f"retrofit recipe {recipe.name} (batch_size {recipe.batch_size}, context {recipe.context})",
                 available)


def _saved_state(out: Path) -> dict:
    """The facts of the resume state in `out` ({} if none); a finished retrofit or a partial
    state is refused (read_state_meta)."""
    from qbench.zoo import CheckpointError

    if (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} already holds a finished retrofit; choose another --out")
    if not (out / STATE_FILE).exists() and not (out / STATE_META).exists():
        return {}
    if not (out / STATE_FILE).exists():
        raise CheckpointError(f"{out} holds a partial retrofit state ({STATE_META} without {STATE_FILE}); "
                              "delete it to start over")
    return read_state_meta(out)
