"""`qbench list WHAT`: what exists (zoo models, attention arms, schemes, presets and
retrofit recipes, perplexity protocols, tasks), one entry per line."""
from __future__ import annotations


def print_listing(what: str) -> int:
    if what == "models":
        from qbench.zoo import read_zoo

        for name, entry in read_zoo().items():
            ppl = entry.get("test_ppl")
            ppl_text = f"test ppl {ppl:.2f}" if isinstance(ppl, (int, float)) else ""
            print(f"{name:16s} {entry.get('arm', '?'):8s} {entry.get('preset', '-'):6s} {ppl_text}")
    elif what == "attention":
        from qbench.modeling import ATTENTION_ARMS

        for arm in ATTENTION_ARMS.values():
            gate = f"gate: {arm.gate_source} -> {arm.gate_position}, init {arm.gate_init}" if arm.gate_source else "no gate"
            print(f"{arm.name:10s} {arm.formula}\n{'':10s} normaliser {arm.normaliser}; {gate}; {arm.description}")
    elif what == "schemes":
        from qbench.quant import SCHEMES

        for scheme in SCHEMES.values():
            print(f"{scheme.name:14s} {scheme.summary()}: {scheme.description}")
    elif what == "presets":
        from qbench.train import PRESETS

        for preset in PRESETS.values():
            values = {k: v for k, v in preset.to_dict().items() if k not in ("name", "description")}
            print(f"{preset.name:12s} {preset.description}\n{'':12s} " + ", ".join(f"{k}={v}" for k, v in values.items()))
        from qbench.retrofit import RECIPES

        for recipe in RECIPES.values():  # `qbench retrofit --preset NAME`
            values = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "description")}
            print(f"{recipe.name:12s} (qbench retrofit) {recipe.description}\n{'':12s} "
                  + ", ".join(f"{k}={v}" for k, v in values.items()))
    elif what == "protocols":
        from qbench.eval.protocols import PROTOCOLS

        for name, text in PROTOCOLS.items():
            print(f"{name:17s} {text}")
    else:
        from qbench.eval.catalogue import registered

        for name, task in registered().items():
            print(f"{name:17s} {task.description}")
        print(f"{'<lm-eval task>':17s} any lm-eval task name (hellaswag, ...) whose dataset is in the local "
              "Hugging Face cache")
    return 0
