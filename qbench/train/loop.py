"""The training loop: one arm with one preset -> a checkpoint folder (save_pretrained,
tokenizer, loss log, model card); deterministic for a seed, resumable from its state."""
from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qbench.modeling import ATTENTION_ARMS, QBenchConfig, QBenchForCausalLM
from qbench.resumable import changed_keys, optimizer_step, run_folder, truncate_log, use_threads
from qbench.suggest import closest
from qbench.train.card import model_card
from qbench.train.data import make_data, validation_loss
from qbench.train.logs import LOG_FILE, MECHANISM_EVERY, MECHANISM_FILE, MechanismLog
from qbench.train.recipes import Preset, get_preset, learning_rate, normalise_recipe, with_settings
from qbench.train.state import STATE_FILE, TRAVEL_FILE, atomic_torch_save, load_state, load_train_state


def train(*args, **kwargs) -> dict:
    """`_train` holding the output folder's writer lock (qbench.resumable.run_folder): a
    second `qbench train` into the same --out stops at once with one line (exit 5)."""
    with run_folder(args[3] if len(args) > 3 else kwargs["out"], "train"):
        return _train(*args, **kwargs)


def check_training_memory(preset: Preset, vocab: int, device: str, available: int | None = None) -> None:
    """Before the model is built: a lower bound of what training allocates (fp32 weights,
    their gradients and AdamW's two moments: 16 bytes a parameter; the logits and their
    gradient: 8 bytes per token and vocabulary entry) against the memory available, so
    `--set d_model=1000000` is one line (exit 2), not a MemoryError traceback.  On a GPU
    only the weights count here (the model is initialised on the CPU)."""
    from qbench.validate import check_memory

    d, layers = preset.d_model, preset.n_layer
    params = 2 * vocab * d + layers * (4 * d * d + 2 * d * preset.d_ff)
    need = 4 * params if device.startswith("cuda") else 16 * params + 8 * preset.batch_size * preset.context * vocab
    check_memory(need, f"recipe {preset.name} (d_model {d}, n_layer {layers}, d_ff {preset.d_ff}, batch_size "
                       f"{preset.batch_size}, context {preset.context})", available)


def _resume(state_path: Path, travel_path: Path, recipe: dict, model, optimizer, generator) -> tuple[int, float]:
    """(step, elapsed seconds) of the saved state in the run's folder, its model, optimizer,
    data-generator and RNG states restored; (0, 0.0) if there is none.  A state trained with
    another recipe is refused in one line that names what differs."""
    if not state_path.exists() and not travel_path.exists():
        return 0, 0.0
    state = load_train_state(state_path) if state_path.exists() else load_state(travel_path)
    if normalise_recipe(state["recipe"]) != normalise_recipe(recipe):
        saved, wanted = normalise_recipe(state["recipe"]), normalise_recipe(recipe)
        diff = changed_keys(saved["preset"], wanted["preset"])
        diff += changed_keys(saved, wanted, ("attention", "seed", "corpus", "arm_options"))
        raise ValueError(f"{state_path} was trained with another recipe (differs in {', '.join(diff)}); "
                         "resume with the same recipe, or choose another --out")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["elapsed"]


def _train(attention: str, preset_name: str | Preset, seed: int, out: Path, corpus: str = "sotu",
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
    use_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(preset, corpus)
    check_training_memory(preset, len(data.tokenizer), device)
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
    state_path = out / STATE_FILE
    travel_path = out / TRAVEL_FILE  # a state handed back from another machine (safetensors)
    step, elapsed = _resume(state_path, travel_path, recipe, model, optimizer, generator)
    log_path = out / LOG_FILE
    if step == 0 or not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "lr", "train_loss", "val_loss", "tokens", "seconds"])
    else:
        truncate_log(log_path, step)
    mechanism = MechanismLog(data, out / MECHANISM_FILE, step) if preset.task == "bigram_backcopy" else None
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
        loss = optimizer_step(model, optimizer, x, device=device, amp=amp, grad_clip=preset.grad_clip, step=step)
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
            atomic_torch_save({
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
