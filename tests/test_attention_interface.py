"""Every argument transformers' attention interface passes is honoured by the one attention
composition (qbench.modeling.compose), applied by the model before the call, or refused
there with an error that names it.

The arguments are enumerated from the installed transformers (the reference functions'
parameters, the keywords of every `attention_interface(...)` call in its models, its typed
attention kwargs, and what every routed family's model passes at run time), so a new
argument fails `test_every_interface_argument_has_a_verdict` until the composition honours
or refuses it.  Honoured arguments are compared with transformers' own eager attention
(for `is_causal`, which eager does not read, with the mask SDPA's reading of it implies):
the same float32 operations in the same order (a zero added where a mask is filled, K/V heads repeated by another op), so equal bit
for bit; each comparison also checks that the argument changes the output, so it is not
vacuous.
"""
import pathlib

import pytest
import torch
import torch.nn as nn

from qbench.modeling.compose import APPLIED_BEFORE, HONOURED, REFUSED
from qbench.modeling.hooks import hf_attention

B, H, H_KV, T, D = 2, 4, 2, 7, 8


def _calls(text: str, marker: str = "attention_interface("):
    """The source of every `attention_interface(...)` call in `text`."""
    start = text.find(marker)
    while start != -1:
        depth, i = 0, start + len(marker) - 1
        for i in range(i, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
        yield text[start:i + 1]
        start = text.find(marker, i)


def interface_arguments() -> set[str]:
    import ast
    import inspect

    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager
    from transformers.utils.generic import TransformersKwargs

    names = set()
    for fn in (sdpa_attention_forward, llama_eager, gemma2_eager):
        names |= {p.name for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD}
    names |= set(TransformersKwargs.__annotations__) | set(FlashAttentionKwargs.__annotations__)
    calls = 0
    for path in pathlib.Path(transformers.__file__).parent.glob("models/*/modeling_*.py"):
        for call in _calls(path.read_text()):
            names |= {k.arg for k in ast.parse(call, mode="eval").body.keywords if k.arg}
            calls += 1
    assert calls > 100, calls  # the scan found the models' calls
    return (names | _run_time_arguments()) - {"module"}


def _run_time_arguments() -> set[str]:
    """The keyword arguments every routed family's tiny model hands the attention function."""
    from test_families_conformance import ROUTED, build, tokens

    from qbench.modeling import compose
    from qbench.modeling.hooks import install_attention

    seen = set()
    interface_call = compose.interface_call

    def recording(module, query, key, attention_mask, scaling, dropout, kwargs):
        seen.update(kwargs)
        return interface_call(module, query, key, attention_mask, scaling, dropout, kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("qbench.modeling.hooks.interface_call", recording)
        for model_type in ROUTED:
            model = build(model_type)
            if model_type != "qbench":
                install_attention(model)
                with torch.no_grad():
                    model(input_ids=tokens())
    assert seen, "no family's attention went through the interface"
    return seen


def test_every_interface_argument_has_a_verdict():
    verdicts = [HONOURED, APPLIED_BEFORE, REFUSED]
    assert not set(HONOURED) & set(APPLIED_BEFORE) and not set(REFUSED) & (set(HONOURED) | set(APPLIED_BEFORE))
    missing = sorted(n for n in interface_arguments() if not n.startswith("qbench_") and not any(n in v for v in verdicts))
    assert not missing, f"attention arguments neither honoured nor refused by qbench.modeling.compose: {missing}"


# -- honoured: compared with transformers' own attention ---------------------------------

class Module(nn.Module):
    """What transformers' attention functions read of an attention module."""

    def __init__(self):
        super().__init__()
        self.num_key_value_groups, self.head_dim, self.is_causal = H // H_KV, D, True
        self.eval()


def qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g) * 2, torch.randn(B, H_KV, T, D, generator=g) * 2,
            torch.randn(B, H_KV, T, D, generator=g))


def mask(hidden: torch.Tensor) -> torch.Tensor:
    """An additive mask (B, 1, T, T) as transformers builds it: 0 visible, the dtype's minimum hidden."""
    return torch.zeros(hidden.shape).masked_fill(hidden, torch.finfo(torch.float32).min).expand(B, 1, T, T)


CAUSAL = torch.ones(T, T, dtype=torch.bool).triu(1)


def ours(*, attention_mask=None, **kwargs):
    q, k, v = qkv()
    return hf_attention(Module(), q, k, v, attention_mask, **kwargs)[0]


def eager(*, attention_mask, softcap=None, **kwargs):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = qkv()
    return eager_attention_forward(Module(), q, k, v, attention_mask, softcap=softcap, **kwargs)[0]


def _padding():
    hidden = CAUSAL.clone().expand(B, T, T).clone()
    hidden[1, :, :2] = True  # the second sequence's first two keys are padding
    hidden[1, :2, 2] = False  # (the padded queries see one key, so no row is empty)
    return hidden[:, None]


def _window(w: int):
    rows = torch.arange(T)[:, None]
    return CAUSAL | (rows - torch.arange(T)[None, :] >= w)


CAUSAL_MASK = mask(CAUSAL)
# argument -> (ours, the reference, the reference without the argument)
CHECKS = {
    "query": lambda: (ours(attention_mask=CAUSAL_MASK), eager(attention_mask=CAUSAL_MASK), None),
    "key": lambda: (ours(attention_mask=CAUSAL_MASK), eager(attention_mask=CAUSAL_MASK), None),
    "value": lambda: (ours(attention_mask=CAUSAL_MASK), eager(attention_mask=CAUSAL_MASK), None),
    "attention_mask": lambda: (ours(attention_mask=mask(_padding())), eager(attention_mask=mask(_padding())),
                               eager(attention_mask=CAUSAL_MASK)),
    "scaling": lambda: (ours(attention_mask=CAUSAL_MASK, scaling=0.7), eager(attention_mask=CAUSAL_MASK, scaling=0.7),
                        eager(attention_mask=CAUSAL_MASK)),
    "softcap": lambda: (ours(attention_mask=CAUSAL_MASK, softcap=1.5), eager(attention_mask=CAUSAL_MASK, softcap=1.5),
                        eager(attention_mask=CAUSAL_MASK)),
    "sliding_window": lambda: (ours(attention_mask=CAUSAL_MASK, sliding_window=3), eager(attention_mask=mask(_window(3))),
                               eager(attention_mask=CAUSAL_MASK)),
    # no mask: is_causal=False sees every key (eager with no mask), as transformers' SDPA reads it
    "is_causal": lambda: (ours(is_causal=False), eager(attention_mask=None), eager(attention_mask=CAUSAL_MASK)),
    "dropout": lambda: (ours(attention_mask=CAUSAL_MASK, dropout=0.0), eager(attention_mask=CAUSAL_MASK, dropout=0.0),
                        None),
    "output_attentions": lambda: (ours(attention_mask=CAUSAL_MASK, output_attentions=False),
                                  eager(attention_mask=CAUSAL_MASK), None),
    "deterministic": lambda: (ours(attention_mask=CAUSAL_MASK, deterministic=True), eager(attention_mask=CAUSAL_MASK),
                              None),
}
# the values at which an honoured argument is refused instead
REFUSED_VALUES = {"dropout": 0.1, "output_attentions": True}


def test_every_honoured_argument_is_checked():
    assert set(CHECKS) == set(HONOURED)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_honoured_argument_gives_transformers_own_attention(name):
    got, want, without = CHECKS[name]()
    assert torch.equal(got, want), (name, float((got - want).abs().max()))
    if without is not None:  # the argument changes the output: the comparison above is not vacuous
        assert (want - without).abs().max() > 1e-3, name


def test_is_causal_defaults_to_the_module_and_yields_to_a_mask():
    assert torch.equal(ours(), eager(attention_mask=CAUSAL_MASK))
    assert torch.equal(ours(is_causal=False, attention_mask=CAUSAL_MASK), ours(attention_mask=CAUSAL_MASK))


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_honoured_argument_is_refused_where_qbench_cannot_honour_its_value(name):
    with pytest.raises(NotImplementedError, match=name):
        ours(attention_mask=CAUSAL_MASK, **{name: REFUSED_VALUES[name]})


# -- applied before the call, refused, unknown ------------------------------------------

@pytest.mark.parametrize("name", sorted(APPLIED_BEFORE))
def test_argument_applied_before_the_call_leaves_the_composition_unchanged(name):
    value = torch.arange(T)[None] if "position" in name else 1
    assert torch.equal(ours(attention_mask=CAUSAL_MASK, **{name: value}), ours(attention_mask=CAUSAL_MASK))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_argument_is_refused_by_name(name):
    assert torch.equal(ours(attention_mask=CAUSAL_MASK, **{name: None}), ours(attention_mask=CAUSAL_MASK))  # absent
    with pytest.raises(NotImplementedError, match=name):
        ours(attention_mask=CAUSAL_MASK, **{name: torch.zeros(H)})


def test_an_unknown_argument_is_refused():
    with pytest.raises(NotImplementedError, match="alibi"):
        ours(attention_mask=CAUSAL_MASK, alibi=torch.zeros(1))
