"""Training recipes: presets -> a checkpoint folder with tokenizer, loss log and model card.

Deterministic for a seed (model init, data order); resumable: the full training state
(model, optimizer, data-generator and RNG states, step) is saved every `save_every` steps
to `train_state.pt` in the output folder, and a rerun of the same command continues
from it.  The final checkpoint is written with `save_pretrained` (safetensors).

  recipes  presets, `--set` / YAML recipe files, the learning-rate schedule
  data     the language-modelling and Bigram-Backcopy streams, the validation loss
  logs     the loss and mechanism CSV logs
  state    the resume state (.pt while running, .safetensors between machines)
  loop     train(): the loop
  card     the model card
"""
from qbench.train.loop import train
from qbench.train.recipes import PRESETS, Preset, get_preset, parse_settings

# the entry points: the loop, the recipes and how `--set` reads them
__all__ = ["PRESETS", "Preset", "get_preset", "parse_settings", "train"]
