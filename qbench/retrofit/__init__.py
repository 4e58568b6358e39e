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

  recipes  recipes and the trainable set
  data     the training windows
  state    the optimiser and the resume state
  loop     retrofit(): the fine-tune, its loss and gate logs
  deltas   the stored deltas, loading them onto the base, the zoo's folder kind
"""
from qbench.retrofit.deltas import CONFIG_FILE, DELTAS_FILE, read_retrofit_config
from qbench.retrofit.loop import GATE_LOG, LOG_FILE, retrofit
from qbench.retrofit.recipes import RECIPES, RetrofitRecipe, get_recipe
from qbench.retrofit.state import STATE_FILE, STATE_META

# the entry points and the names of a retrofit folder's files
__all__ = ["CONFIG_FILE", "DELTAS_FILE", "GATE_LOG", "LOG_FILE", "RECIPES", "STATE_FILE", "STATE_META",
           "RetrofitRecipe", "get_recipe", "load_retrofit", "read_retrofit_config", "retrofit"]


def load_retrofit(folder, name: str | None = None):
    """A retrofit folder loaded as the zoo loads it (qbench.zoo: the base resolved and its
    checkpoint hash checked, the arm installed, the deltas applied): a LoadedModel."""
    from dataclasses import replace

    from qbench.zoo import resolve_model

    loaded = resolve_model(str(folder)).load()
    return loaded if name is None else replace(loaded, name=name)
