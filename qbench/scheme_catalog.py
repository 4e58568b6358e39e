"""The named schemes as data: each one's fields (qbench.quant.scheme.Scheme, which checks
them against the handlers it names when the registry builds it) and what the report, the
study and recheck show of it, so none of them keeps a list of scheme names:

  label  a short column title (the study's tables); default: the name
  tags   "screen:<column>": the report's first screen shows the scheme in that column
         (SCREEN_COLUMNS, in order; a column tagged by several schemes shows the best)

What a scheme's handlers say of it (its family, the packages it needs, whether a cell
takes minutes) is declared on the handlers (qbench.quant.handlers, scheme_info there).

Plain data: imports neither torch nor anything of qbench, so the report reads it without
the quantization code (tests/test_imports.py).  A scheme defined in code is added by
qbench.quant.scheme.register, with its label and tags."""
from __future__ import annotations

from dataclasses import dataclass

# the report's first screen, in order: one column per representative scheme, or the best
# of the outlier-aware post-training methods at one width
SCREEN_COLUMNS = ("w8a8-dyn", "w8a8-pt", "best 8b PTQ", "llm-int8", "w4-rtn-g64", "best 4b PTQ", "nf4", "w8a8-attn")


@dataclass(frozen=True)
class SchemeEntry:
    fields: dict  # Scheme(**fields): name, backend, description and the rest
    label: str
    tags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.fields["name"]


CATALOG: dict[str, SchemeEntry] = {}


def add(fields: dict, label: str | None = None, tags=()) -> SchemeEntry:
    """Enter a scheme (its fields as Scheme takes them) with its label and tags."""
    name = fields["name"]
    if name in CATALOG:
        raise ValueError(f"scheme {name!r} is defined twice")
    bad = [t for t in tags if t.startswith("screen:") and t.removeprefix("screen:") not in SCREEN_COLUMNS]
    if bad:
        raise ValueError(f"scheme {name!r}: tag(s) {bad} name no first-screen column; one of {list(SCREEN_COLUMNS)}")
    CATALOG[name] = SchemeEntry(dict(fields), label or name, tuple(tags))
    return CATALOG[name]


def define(name: str, backend: str, description: str, *, label: str | None = None, tags=(), **fields) -> None:
    add({"name": name, "backend": backend, "description": description, **fields}, label, tags)


def label(name: str) -> str:
    """The scheme's short label (its name if it has none or is not defined here)."""
    entry = CATALOG.get(name)
    return entry.label if entry else name


def tagged(tag: str) -> list[str]:
    """The schemes carrying `tag`, in definition order."""
    return [name for name, entry in CATALOG.items() if tag in entry.tags]


def screen_columns() -> list[tuple[str, list[str]]]:
    """The first screen: (column, the schemes it shows), columns in SCREEN_COLUMNS order."""
    return [(column, tagged(f"screen:{column}")) for column in SCREEN_COLUMNS]


def kv(bits: int, key_axis: str = "token", group_size: int | None = None, residual: int = 0, sink: int = 0) -> dict:
    """options["kv_cache"]: a KVCacheSpec's fields (qbench.quant.kvcache; it checks them)."""
    return {"bits": bits, "key_axis": key_axis, "value_axis": "token", "group_size": group_size,
            "residual": residual, "sink": sink}


W8A8 = dict(weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token")
W8A8_PT = dict(weight_bits=8, weight_granularity="per_tensor", activation_bits=8, activation_granularity="per_tensor",
               activation_static=True)

define("fp32", "reference", "full precision reference")
define("bf16", "reference", "bfloat16 reference", dtype="bfloat16")
define("w8a8-dyn", "simulated",
       "per-output-channel symmetric int8 weights, per-token dynamic symmetric int8 activations on every linear layer",
       label="W8A8-dyn", tags=("screen:w8a8-dyn",), **W8A8)
define("w8a8-attn", "simulated",
       "w8a8-dyn plus the low-precision attention kernel: int8 Q K^T, 8-bit P (scale 1/255), 8-bit P V and gate",
       tags=("screen:w8a8-attn",), **W8A8, options={"attention_kernel": {"probs": "int8", "qkv_granularity": "token"}})
define("w8a8-attn-fp8", "simulated", "w8a8-attn with the attention probabilities in float8 e4m3",
       **W8A8, options={"attention_kernel": {"probs": "fp8", "qkv_granularity": "token"}})
define("w8a8-dyn-int8", "simulated", "w8a8-dyn computed with real int8 x int8 -> int32 matmuls (torch._int_mm)",
       **W8A8, int8_matmul=True)

# Bondarenko et al.'s protocol: per-tensor symmetric weights, static asymmetric per-tensor
# activations by running min-max (momentum 0.9) over 16 calibration batches.
_PT = {"calibration_batches": 16, "calibration_seed": 0, "calibration_batch_size": 4, "momentum": 0.9,
       "weight_range": "minmax", "activation_range": "minmax"}
define("w8a8-pt", "static",
       "Bondarenko W8A8: per-tensor weights; static activations at linear in/out, QK^T, softmax, PV, "
       "residual sums, embeddings, norms", label="W8A8-pt", tags=("screen:w8a8-pt",), **W8A8_PT, options=_PT)
define("w8a8-pt-mse", "static", "w8a8-pt with MSE-searched weight ranges",
       **W8A8_PT, options={**_PT, "weight_range": "mse"})
for _p in ("99.99", "99.999"):
    define(f"w8a8-pt-p{_p.replace('.', '')}", "static", f"w8a8-pt with {_p}th-percentile activation ranges",
           **W8A8_PT, options={**_PT, "activation_range": "percentile", "percentile": float(_p)})
define("w8a8-pt-gates", "static", "w8a8-pt with the gate branch quantized too", **W8A8_PT, quantize_gates=True,
       options=_PT)
define("w6a6", "static", "activation stress test: the w8a8-pt protocol at 6 bits",
       **{**W8A8_PT, "weight_bits": 6, "activation_bits": 6}, options=_PT)
define("w4a8", "static", "4-bit per-channel weights with MSE ranges, 8-bit static activations (Bondarenko T10)",
       label="W4A8", **{**W8A8_PT, "weight_bits": 4, "weight_granularity": "per_channel"},
       options={**_PT, "weight_range": "mse"})
for _g in (32, 64, 128):
    define(f"w4-rtn-g{_g}", "weight_only", f"4-bit round-to-nearest weights, asymmetric, groups of {_g}",
           label=f"W4 RTN g{_g}", tags=("screen:w4-rtn-g64",) if _g == 64 else (),
           weight_bits=4, weight_granularity="group", options={"group_size": _g, "symmetric": False})
define("w4-rtn-pc", "weight_only", "4-bit round-to-nearest weights, asymmetric, per output channel",
       weight_bits=4, weight_granularity="per_channel", options={"symmetric": False})

define("llm-int8", "bitsandbytes", "bitsandbytes LLM.int8: vector-wise int8, fp16 outliers above 6.0",
       tags=("screen:llm-int8",), **W8A8, options={"method": "int8", "threshold": 6.0})
define("llm-int8-t0", "bitsandbytes", "bitsandbytes LLM.int8 with threshold 0: no outlier rescue",
       **W8A8, options={"method": "int8", "threshold": 0.0})
for _q in ("nf4", "fp4"):
    define(_q, "bitsandbytes", f"bitsandbytes Linear4bit {_q.upper()} weights (blocks of 64), fp32 compute",
           tags=("screen:nf4",) if _q == "nf4" else (), weight_bits=4, weight_granularity="group",
           options={"method": "4bit", "quant_type": _q, "compute_dtype": "float32", "group_size": 64})
_CAL = {"calibration_batches": 16, "calibration_seed": 0, "calibration_batch_size": 4}
_QUANTO_A8 = dict(weight_bits=8, weight_granularity="per_channel", activation_bits=8,
                  activation_granularity="per_tensor", activation_static=True)
define("quanto-w8a8", "quanto", "optimum-quanto qint8 weights and calibrated qint8 activations",
       **_QUANTO_A8, options={"weights": "qint8", "activations": "qint8", **_CAL})
define("quanto-w4", "quanto", "optimum-quanto qint4 weights (groups of 128), activations fp",
       weight_bits=4, weight_granularity="group", options={"weights": "qint4", "group_size": 128})
define("quanto-fp8", "quanto", "optimum-quanto qfloat8 (e4m3) weights and calibrated activations",
       **_QUANTO_A8, options={"weights": "qfloat8", "activations": "qfloat8", **_CAL})

# Outlier-aware post-training methods (issue 15).  A "transform" is an equivalence-preserving
# float rewrite applied before the quantizers named by the rest of the scheme; calibrated
# ones draw from the training split with the scheme's calibration seed (--calibration-seeds).
_BEST8 = ("screen:best 8b PTQ",)
_SQ = {"transform": {"method": "smoothquant", "alpha": 0.5}}
define("w8a8-sq", "simulated", "SmoothQuant (alpha 0.5, folded into the norms), then w8a8-dyn",
       label="dyn + SQ", tags=_BEST8, **W8A8, options={**_SQ, **_CAL})
for _a in (0.25, 0.75, 0.85):
    define(f"w8a8-sq-a{int(_a * 100)}", "simulated", f"w8a8-sq with SmoothQuant alpha {_a}", tags=_BEST8,
           **W8A8, options={"transform": {"method": "smoothquant", "alpha": _a}, **_CAL})
define("w8a8-pt-sq", "static", "SmoothQuant (alpha 0.5), then the w8a8-pt protocol", label="+ SmoothQuant",
       tags=_BEST8, **W8A8_PT, options={**_PT, **_SQ})
_HAD = {"transform": {"method": "hadamard"}}
define("w8a8-had", "simulated",
       "residual stream rotated by a randomized Hadamard matrix (norms folded, QuaRot offline part; "
       "the draw seed seeds the signs), then w8a8-dyn",
       label="dyn + rotation", tags=_BEST8, **W8A8, options={**_HAD, "calibration_seed": 0})
define("w8a8-pt-had", "static", "Hadamard-rotated residual stream, then the w8a8-pt protocol", label="+ rotation",
       tags=_BEST8, **W8A8_PT, options={**_PT, **_HAD})
define("w4a8-had", "static", "Hadamard-rotated residual stream, then w4a8", label="W4A8 + rotation",
       **{**W8A8_PT, "weight_bits": 4, "weight_granularity": "per_channel"},
       options={**_PT, "weight_range": "mse", **_HAD})
# groups of 64 as well: SmolLM2's width (576) is not a multiple of 128
for _g in (128, 64):
    _best4 = ("screen:best 4b PTQ",) if _g == 64 else ()
    define(f"w4-gptq-g{_g}", "weight_only", f"GPTQ 4-bit weights, asymmetric, groups of {_g} (damping 0.01)",
           label=f"GPTQ g{_g}", tags=_best4, weight_bits=4, weight_granularity="group",
           options={"method": "gptq", "group_size": _g, "symmetric": False, "percdamp": 0.01, **_CAL})
    define(f"w4-awq-g{_g}", "weight_only",
           f"AWQ 4-bit weights (torchao's scale search, 20-point grid), asymmetric, groups of {_g}",
           label=f"AWQ g{_g}", tags=_best4, weight_bits=4, weight_granularity="group",
           options={"method": "awq", "group_size": _g, "symmetric": False, "grid": 20, **_CAL})
define("w4-hqq-g64", "weight_only", "HQQ 4-bit weights (the hqq library, no calibration), groups of 64",
       label="HQQ g64", tags=("screen:best 4b PTQ",), weight_bits=4, weight_granularity="group",
       options={"method": "hqq", "group_size": 64})

# KV-cache quantization (issue 23): `options["kv_cache"]` holds a KVCacheSpec (qbench.quant.kvcache),
# so a KV scheme composes with any weight/activation scheme and the schemes above keep their hashes.
# Alone it rides on the fp32 reference; no calibration draw.
_KIVI = {"key_axis": "channel", "group_size": 32, "residual": 128}
_KV = {  # name: (kv_cache options, what it is)
    **{f"kv{b}": (kv(b), f"{b}-bit K and V per token over the whole head, every token quantized") for b in (8, 4, 2)},
    **{f"kv{b}-sink1": (kv(b, sink=1), f"kv{b} with the first (sink) token's K and V exact (IntactKV)")
       for b in (8, 4, 2)},
    **{f"kv{b}-kivi-g32-r128": (kv(b, **_KIVI),
                                f"KIVI-{b}: keys per channel over groups of 32 tokens, values per token in groups of "
                                f"32 channels, the last 128 tokens exact") for b in (4, 2)},
    "kv2-kivi-g32-r128-sink1": (kv(2, sink=1, **_KIVI), "KIVI-2 with the sink token exact too"),
    # KIVI-2's parts one at a time: groups of 32 channels per token, then the 128-token window
    "kv2-g32": (kv(2, group_size=32), "2-bit K and V per token in groups of 32 channels"),
    "kv2-g32-r128": (kv(2, group_size=32, residual=128), "kv2-g32 with the last 128 tokens exact"),
    # per-channel keys with the shortest window they allow (a key group is quantized when complete)
    **{f"kv2-kivi-g32-r32{sink}": (kv(2, "channel", group_size=32, residual=32, sink=1 if sink else 0),
                                   f"KIVI-2 with a 32-token window{' and the sink token exact' if sink else ''}")
       for sink in ("", "-sink1")},
}
for _name, (_options, _text) in _KV.items():
    define(_name, "reference", _text, options={"kv_cache": _options})
for _name in ("kv4", "kv4-sink1"):
    define(f"w8a8-dyn-{_name}", "simulated", f"w8a8-dyn weights and activations, {_name} cache",
           **W8A8, options={"kv_cache": _KV[_name][0]})
