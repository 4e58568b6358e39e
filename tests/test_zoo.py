"""The committed zoo loads and reproduces the perplexities recorded in models/zoo.yaml."""
import pytest

from qbench.eval.protocols import resolve_protocol
from qbench.eval import evaluate_perplexity
from qbench.modeling.attention import ATTENTION_ARMS
from qbench.zoo import load_model, read_zoo

ZOO = read_zoo()
TRAINED = ["tiny-softmax", "tiny-vga", "tiny-iga", "bb-softmax", "bb-vga"]
TINY_ARMS = list(ATTENTION_ARMS)  # every registered arm has two tiny seeds in the zoo


def test_every_checkpoint_folder_is_listed_with_its_seed():
    from qbench.paths import models_dir

    folders = sorted(p.name for p in models_dir().iterdir() if (p / "config.json").exists())
    assert folders and all(name in ZOO for name in folders)
    for name in folders:
        entry = ZOO[name]
        assert {"arm", "preset", "seed", "steps", "checkpoint_hash"} <= set(entry), name
        assert name == f"{entry['preset']}-{entry['arm'].replace('_', '-')}" + (
            f"-s{entry['seed']}" if entry["seed"] else "") + ("-3k" if name.endswith("-3k") else "")
        assert load_model(name).checkpoint_hash == entry["checkpoint_hash"]


def test_every_zoo_arm_is_a_registered_arm():
    from qbench.modeling.attention import ATTENTION_ARMS

    arms = {e["arm"] for e in ZOO.values() if e.get("preset") in ("tiny", "small", "bb")}
    assert arms <= set(ATTENTION_ARMS), arms - set(ATTENTION_ARMS)


def test_every_tiny_arm_has_two_training_seeds():
    seeds = {}
    for entry in ZOO.values():
        if entry.get("preset") == "tiny":
            seeds.setdefault(entry["arm"], set()).add(entry["seed"])
    assert all(len(seeds.get(arm, ())) >= 2 for arm in TINY_ARMS), seeds


def test_zoo_lists_the_required_models():
    for name in TRAINED + ["smollm2-135m"]:
        assert name in ZOO, f"{name} missing from models/zoo.yaml"
    for name in TRAINED:
        entry = ZOO[name]
        assert entry["arm"] == name.split("-", 1)[1] and entry["preset"] == name.split("-")[0]
        assert entry["validation_ppl"] > 1 and entry["test_ppl"] > 1


def _same_recipe(names):
    recipes = [load_model(n).info["training"]["recipe"] for n in names]
    return all(r == recipes[0] for r in recipes)


def test_tiny_arms_share_data_seed_steps_and_recipe():
    infos = [load_model(n).info["training"] for n in TRAINED[:3]]
    assert len({(i["seed"], i["steps"], i["data"]["hashes"]["train"]) for i in infos}) == 1
    assert _same_recipe(TRAINED[:3])


# SmolLM2 and the retrofits built on it (entries with a `base`): the slow tests below
@pytest.mark.parametrize("name", [n for n in ZOO if n != "smollm2-135m" and "base" not in ZOO[n]])
def test_zoo_checkpoint_reproduces_its_test_perplexity(name):
    """Every checkpoint, through today's arm registry, hooks and kernel-free float path."""
    entry = ZOO[name]
    loaded = load_model(name)
    assert loaded.checkpoint_hash == entry["checkpoint_hash"]
    protocol = resolve_protocol(loaded, entry["test_protocol"]["max_chars"])
    assert protocol.id == entry["test_protocol"]["id"]
    ppl = evaluate_perplexity(loaded.model, loaded.tokenizer, protocol)["ppl"]
    assert ppl == pytest.approx(entry["test_ppl"], rel=0.01)


@pytest.mark.slow
def test_smollm2_loads_from_its_package_and_reproduces_its_perplexity():
    entry = ZOO["smollm2-135m"]
    loaded = load_model("smollm2-135m")
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    protocol = resolve_protocol(loaded, entry["test_protocol"]["max_chars"])
    ppl = evaluate_perplexity(loaded.model, loaded.tokenizer, protocol)["ppl"]
    assert ppl == pytest.approx(entry["test_ppl"], rel=0.01)


@pytest.mark.slow
def test_smollm2_probes_show_its_known_extreme_tokens():
    """REFERENCE.md section 5: 40-60% of attention on token 0 in layers 12-28 and a massive
    activation of about 23,000 in one residual channel at the first token."""
    from qbench.eval.catalogue import get_task
    from qbench.eval.protocols import resolve_protocol
    from qbench.eval.perplexity import protocol_windows
    from qbench.probes import run_probes

    loaded = load_model("smollm2-135m")
    protocol = get_task("probes").protocol(resolve_protocol(loaded, 20000))
    windows, _, _ = protocol_windows(protocol, loaded.tokenizer)
    windows = [w for w in windows if len(w) == protocol.window][:16]
    result = run_probes(loaded.model, windows)
    share = result["first_token_share_per_layer"]
    middle = sum(share[12:29]) / len(share[12:29])
    assert middle > 0.4 and middle > 4 * sum(share[:3]) / 3  # sinks form in the middle, not at the input
    assert result["massive_activation_max"] > 10_000
    assert result["max_activation_position"] == 0
    assert result["massive_activations"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO if "base" in ZOO[n]])
def test_retrofit_entries_load_on_their_base_with_the_listed_hash(name):
    """A retrofit entry (qbench retrofit): deltas on top of its base, hash-checked."""
    entry = ZOO[name]
    loaded = load_model(name)
    assert loaded.checkpoint_hash == entry["checkpoint_hash"]
    if "test_ppl" in entry:
        protocol = resolve_protocol(loaded, entry["test_protocol"]["max_chars"])
        ppl = evaluate_perplexity(loaded.model, loaded.tokenizer, protocol)["ppl"]
        assert ppl == pytest.approx(entry["test_ppl"], rel=0.01)
