"""A scheme is data: every field is read by its backend or refused when the scheme is
defined; backends, transforms and add-ons are registered handlers; the key is what computes."""
import copy
import dataclasses

import pytest
import torch

from qbench.modeling import QBenchConfig, QBenchForCausalLM
from qbench.quant import SCHEMES, Scheme, get_scheme, quantize
from qbench.quant.handlers import MODULES, REGISTRY, get_handler, register
from qbench.quant.weight_only import METHOD_MODULES

# widths that every registered group size (32..128) and bitsandbytes' 4-bit blocks divide;
# a gated arm, so quantize_gates has gates to quantize, 32 of them (one per head: bitsandbytes'
# 4-bit CPU kernel packs output rows by 32); a sequence past the longest KV window (128).  KV
# schemes get 2 heads of 64 channels instead (KV groups of 32 channels per head).
CONFIG = dict(vocab_size=320, n_layer=1, d_model=128, d_ff=256, attention="vga", max_position_embeddings=192)
SEQUENCE = 160
CALIBRATION_TOKENS = 8


def tiny_model(n_head=32):
    torch.manual_seed(0)
    return QBenchForCausalLM(QBenchConfig(n_head=n_head, **CONFIG)).eval()


def calibration(n, seed, batch_size):
    """Two short batches drawn from all three parameters (fast; a backend that drops one of
    them gets the same batches, so the field test sees it)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n * 1_009 + batch_size)
    return [torch.randint(3, 320, (2, CALIBRATION_TOKENS), generator=generator) for _ in range(2)]


@pytest.fixture(scope="module")
def models_and_input():
    """Tiny models, one per head count, run on one thread: their ops are so small that a
    second thread only adds synchronisation (100x slower on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randint(3, 320, (1, SEQUENCE), generator=torch.Generator().manual_seed(1))
    yield {n_head: tiny_model(n_head) for n_head in (2, 32)}, x
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_and_input(models_and_input):
    models, x = models_and_input
    return models[32], x


def outputs(model, x, scheme):
    quantized = copy.deepcopy(model)
    quantize(quantized, scheme, calibration)
    with torch.no_grad():
        return quantized(x).logits


# a valid other value for each string a scheme holds (a string missing here fails the test:
# an unknown value would be refused at definition and prove nothing about the field)
OTHER_STRING = {"per_channel": "per_tensor", "per_tensor": "per_channel", "per_token": "per_tensor",
                "group": "per_channel", "float32": "bfloat16", "bfloat16": "float32", "nf4": "fp4", "fp4": "nf4",
                "qint8": "qfloat8", "qfloat8": "qint8", "qint4": "qint8", "minmax": "mse", "mse": "minmax",
                "percentile": "minmax", "int8": "fp8", "fp8": "int8", "token": "head", "head": "token",
                "channel": "token"}
# registered names (backends, transforms, weight methods): the next of the same kind, from the registries
REGISTERED_NAMES = [sorted(MODULES["backend"]), sorted(MODULES["transform"]), sorted(METHOD_MODULES)]
# where a field's valid values differ from OTHER_STRING's pick: (field, value) -> a valid other value
OTHER_FOR_FIELD = {("method", "int8"): "4bit", ("method", "4bit"): "int8",
                   ("activation_range", "minmax"): "percentile", ("activation_range", "percentile"): "minmax",
                   ("key_axis", "token"): "channel", ("bits", 2): 3}


def other_string(value: str) -> str:
    for names in REGISTERED_NAMES:
        if value in names:
            return names[(names.index(value) + 1) % len(names)]
    if value not in OTHER_STRING:
        pytest.fail(f"no valid other value for the string {value!r}: add one to OTHER_STRING")
    return OTHER_STRING[value]


def changed(value, field=None):
    """Another valid value of the same kind: OTHER_FOR_FIELD's for the field, else a flipped
    bool, a halved (or new) number, the other string of OTHER_STRING."""
    if (field, value) in OTHER_FOR_FIELD and not isinstance(value, bool):
        return OTHER_FOR_FIELD[field, value]
    if isinstance(value, bool):
        return not value
    if value is None:
        return 8
    if isinstance(value, int):
        return value // 2 if value > 1 else value + 1
    if isinstance(value, float):
        return value / 2 if value else 1.0
    if isinstance(value, str):
        return other_string(value)
    raise TypeError(f"no change for {value!r}")


def variants(scheme: Scheme):
    """(what, changed scheme fields) for every field but the prose, and every option
    (nested ones too) changed on its own."""
    for field in dataclasses.fields(scheme):
        if field.name in ("name", "description", "options"):
            continue
        yield field.name, {field.name: changed(getattr(scheme, field.name), field.name)}
    for key, value in scheme.options.items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                yield f"options.{key}.{inner}", {"options": {**scheme.options,
                                                            key: {**value, inner: changed(inner_value, inner)}}}
        else:
            yield f"options.{key}", {"options": {**scheme.options, key: changed(value, key)}}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_field_changes_the_output_or_is_refused_at_definition(name, models_and_input):
    models, x = models_and_input
    scheme = get_scheme(name)
    model = models[2 if "kv_cache" in scheme.options else 32]
    base = outputs(model, x, scheme)
    ignored = []
    for what, change in variants(scheme):
        try:
            variant = dataclasses.replace(scheme, **change)
        except ValueError:
            continue  # refused when defined
        if torch.equal(outputs(model, x, variant), base):
            ignored.append(f"{what} -> {change}")
    assert not ignored, f"{name}: changing these left the output unchanged: {ignored}"


def test_refusals_name_the_field_and_the_backend():
    with pytest.raises(ValueError, match=r"'bitsandbytes'.*dtype='bfloat16'"):
        dataclasses.replace(get_scheme("nf4"), dtype="bfloat16")
    with pytest.raises(ValueError, match=r"version\(s\) \[1\], not 2"):
        dataclasses.replace(get_scheme("w8a8-dyn"), version=2)
    with pytest.raises(ValueError, match=r"no handler reads option\(s\) \['momentum'\]"):
        dataclasses.replace(get_scheme("w8a8-dyn"), options={"momentum": 0.9})
    with pytest.raises(ValueError, match="unknown backend 'simulatd'.*did you mean 'simulated'"):
        Scheme("x", "simulatd", "a typo", weight_bits=8, weight_granularity="per_channel")
    with pytest.raises(ValueError, match="activation_granularity 'per_block'"):
        dataclasses.replace(get_scheme("w8a8-dyn"), activation_granularity="per_block")


def test_the_key_is_what_computes():
    keys = {s.key_json() for s in SCHEMES.values()}
    assert len(keys) == len(SCHEMES) == len({s.hash() for s in SCHEMES.values()})  # no two collide
    scheme = get_scheme("w8a8-pt")
    reworded = dataclasses.replace(scheme, name="renamed", description="other words")
    assert reworded.hash() == scheme.hash() and reworded.to_json() != scheme.to_json()
    assert dataclasses.replace(scheme, weight_bits=6).hash() != scheme.hash()
    assert "description" not in scheme.key_json() and '"name"' not in scheme.key_json()
    with pytest.raises(ValueError, match="computes what 'w8a8-pt' computes"):
        from qbench.quant.scheme import register as register_scheme

        register_scheme(reworded)


def test_every_named_handler_is_registered_by_its_module():
    for kind, names in MODULES.items():
        for name in names:
            handler = get_handler(kind, name)
            assert handler.kind == kind and handler.name == name and handler.apply.__module__ == names[name]


def test_a_new_backend_is_a_registration_and_quantize_dispatches_to_it(model_and_input):
    model, x = model_and_input
    calls = []

    @register("backend", "test-identity", fields=("quantize_gates",))
    def identity(model, scheme, calibration=None):
        calls.append(scheme.name)
        return {"quantized_linears": 0}

    try:
        scheme = Scheme("test-identity", "test-identity", "does nothing", quantize_gates=True)
        facts = quantize(copy.deepcopy(model), scheme)
        assert calls == ["test-identity"] and facts == {"quantized_linears": 0}
        with pytest.raises(ValueError, match="registered twice"):
            register("backend", "test-identity")(identity)
        with pytest.raises(ValueError, match="does not honour weight_bits=4"):
            Scheme("t", "test-identity", "", weight_bits=4)
    finally:
        del REGISTRY["backend"]["test-identity"]
