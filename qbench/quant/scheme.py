"""Quantization schemes as data: frozen dataclasses with a version, a JSON round trip and a
stable hash of what computes (part of every result key), and a registry that names them.

Every field is read by the backend (or transform, or add-on) the scheme names, or the
scheme is refused when it is defined (qbench.quant.handlers.check_scheme).  The name and
the description are prose: outside the key, so rewording one moves no record."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from qbench.quant.handlers import PROSE_FIELDS, check_scheme
from qbench.suggest import closest


@dataclass(frozen=True)
class Scheme:
    name: str
    # a registered backend (qbench.quant.handlers.MODULES): "reference" (no quantization),
    # "simulated" (dynamic, qbench's own), "static" (Bondarenko protocol, calibrated),
    # "weight_only", "bitsandbytes", "quanto"
    backend: str
    description: str
    weight_bits: int | None = None
    weight_granularity: str | None = None  # "per_channel" | "per_tensor" | "group"
    activation_bits: int | None = None
    activation_granularity: str | None = None  # "per_token" | "per_tensor"
    activation_static: bool = False  # ranges calibrated once (static) or measured per call (dynamic)
    dtype: str = "float32"  # the compute dtype of everything left unquantized
    int8_matmul: bool = False  # real int8 x int8 -> int32 matmuls instead of fake quantization
    quantize_gates: bool = False
    version: int = 1  # of the backend's algorithm; each backend lists the versions it implements
    options: dict = field(default_factory=dict)  # backend, transform and add-on parameters

    def __post_init__(self):
        check_scheme(self)

    def to_json(self) -> str:
        """Everything, prose included (the round trip)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Scheme":
        return cls(**json.loads(text))

    def key_json(self) -> str:
        """What computes: the canonical JSON without the name and the description (the
        scheme part of a result key)."""
        return key_json(asdict(self))

    def hash(self) -> str:
        """Stable across processes and machines: sha256 of the key JSON."""
        return scheme_hash(self.key_json())

    def __hash__(self) -> int:  # options is a dict: hash by the canonical JSON instead
        return hash(self.to_json())

    def summary(self) -> str:
        if self.backend == "reference" and not self.options.get("kv_cache"):
            return f"{self.dtype} reference, no quantization"
        weights = f"W{self.weight_bits} {self.weight_granularity}" if self.weight_bits else "weights fp"
        acts = (f"A{self.activation_bits} {self.activation_granularity} "
                f"{'static' if self.activation_static else 'dynamic'}") if self.activation_bits else "activations fp"
        if self.options.get("group_size"):
            weights += f" g{self.options['group_size']}"
        path = "real int8 matmul" if self.int8_matmul else ""
        calibration = (f", {self.options['calibration_batches']} calibration batches"
                       if "calibration_batches" in self.options else "")
        spec = self.kv_cache()
        kv = (f"; {spec.formula()} [K+V bytes/token per 64-wide KV head: {spec.bytes_per_token(64):.1f}, "
              f"{spec.bytes_per_token(64, 4096):.1f} at 4,096 tokens; fp16 256]") if spec else ""
        if self.backend == "reference":
            return f"[{self.dtype}] weights and activations fp{kv}"
        return f"[{self.backend}] {weights}, {acts}{calibration}{', ' + path if path else ''}{kv}"

    def kv_cache(self):
        """The KV-cache quantization (qbench.quant.kvcache.KVCacheSpec), or None."""
        from qbench.quant.kvcache import KVCacheSpec

        options = self.options.get("kv_cache")
        return KVCacheSpec.from_options(options) if options else None


def key_json(fields: dict) -> str:
    """The key JSON of a scheme given as a dict of its fields (a record's stored form too)."""
    return json.dumps({k: v for k, v in fields.items() if k not in PROSE_FIELDS}, sort_keys=True,
                      separators=(",", ":"))


def scheme_hash(key_json_text: str) -> str:
    """A record's scheme_hash: the first 16 hex digits of the key JSON's sha256."""
    return hashlib.sha256(key_json_text.encode()).hexdigest()[:16]


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is registered twice")
    same = [other.name for other in SCHEMES.values() if other.key_json() == scheme.key_json()]
    if same:
        raise ValueError(f"scheme {scheme.name!r} computes what {same[0]!r} computes (same key); "
                         "give it a field or option that differs, or use the existing one")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise KeyError(f"unknown scheme {name!r}{closest(name, SCHEMES)}")
    return SCHEMES[name]


register(Scheme("fp32", "reference", "full precision reference"))
register(Scheme("bf16", "reference", "bfloat16 reference", dtype="bfloat16"))
register(Scheme(
    "w8a8-dyn", "simulated",
    "per-output-channel symmetric int8 weights, per-token dynamic symmetric int8 activations on every linear layer",
    weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token",
))
register(Scheme(
    "w8a8-attn", "simulated",
    "w8a8-dyn plus the low-precision attention kernel: int8 Q K^T, 8-bit P (scale 1/255), 8-bit P V and gate",
    weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token",
    options={"attention_kernel": {"probs": "int8", "qkv_granularity": "token"}},
))
register(Scheme(
    "w8a8-attn-fp8", "simulated", "w8a8-attn with the attention probabilities in float8 e4m3",
    weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token",
    options={"attention_kernel": {"probs": "fp8", "qkv_granularity": "token"}},
))
register(Scheme(
    "w8a8-dyn-int8", "simulated",
    "w8a8-dyn computed with real int8 x int8 -> int32 matmuls (torch._int_mm)",
    weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token",
    int8_matmul=True,
))

# Bondarenko et al.'s protocol: per-tensor symmetric weights, static asymmetric per-tensor
# activations by running min-max (momentum 0.9) over 16 calibration batches.
_PT = {"calibration_batches": 16, "calibration_seed": 0, "calibration_batch_size": 4, "momentum": 0.9,
       "weight_range": "minmax", "activation_range": "minmax"}
register(Scheme("w8a8-pt", "static",
                "Bondarenko W8A8: per-tensor weights; static activations at linear in/out, QK^T, softmax, PV, "
                "residual sums, embeddings, norms",
                weight_bits=8, weight_granularity="per_tensor", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True, options=_PT))
register(Scheme("w8a8-pt-mse", "static", "w8a8-pt with MSE-searched weight ranges",
                weight_bits=8, weight_granularity="per_tensor", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True, options={**_PT, "weight_range": "mse"}))
for _p in ("99.99", "99.999"):
    register(Scheme(f"w8a8-pt-p{_p.replace('.', '')}", "static", f"w8a8-pt with {_p}th-percentile activation ranges",
                    weight_bits=8, weight_granularity="per_tensor", activation_bits=8,
                    activation_granularity="per_tensor", activation_static=True,
                    options={**_PT, "activation_range": "percentile", "percentile": float(_p)}))
register(Scheme("w8a8-pt-gates", "static", "w8a8-pt with the gate branch quantized too",
                weight_bits=8, weight_granularity="per_tensor", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True, quantize_gates=True, options=_PT))
register(Scheme("w6a6", "static", "activation stress test: the w8a8-pt protocol at 6 bits",
                weight_bits=6, weight_granularity="per_tensor", activation_bits=6,
                activation_granularity="per_tensor", activation_static=True, options=_PT))
register(Scheme("w4a8", "static", "4-bit per-channel weights with MSE ranges, 8-bit static activations (Bondarenko T10)",
                weight_bits=4, weight_granularity="per_channel", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True, options={**_PT, "weight_range": "mse"}))
for _g in (32, 64, 128):
    register(Scheme(f"w4-rtn-g{_g}", "weight_only", f"4-bit round-to-nearest weights, asymmetric, groups of {_g}",
                    weight_bits=4, weight_granularity="group", options={"group_size": _g, "symmetric": False}))
register(Scheme("w4-rtn-pc", "weight_only", "4-bit round-to-nearest weights, asymmetric, per output channel",
                weight_bits=4, weight_granularity="per_channel", options={"symmetric": False}))

register(Scheme("llm-int8", "bitsandbytes", "bitsandbytes LLM.int8: vector-wise int8, fp16 outliers above 6.0",
                weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token",
                options={"method": "int8", "threshold": 6.0}))
register(Scheme("llm-int8-t0", "bitsandbytes", "bitsandbytes LLM.int8 with threshold 0: no outlier rescue",
                weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token",
                options={"method": "int8", "threshold": 0.0}))
for _q in ("nf4", "fp4"):
    register(Scheme(_q, "bitsandbytes", f"bitsandbytes Linear4bit {_q.upper()} weights (blocks of 64), fp32 compute",
                    weight_bits=4, weight_granularity="group",
                    options={"method": "4bit", "quant_type": _q, "compute_dtype": "float32", "group_size": 64}))
_CAL = {"calibration_batches": 16, "calibration_seed": 0, "calibration_batch_size": 4}
register(Scheme("quanto-w8a8", "quanto", "optimum-quanto qint8 weights and calibrated qint8 activations",
                weight_bits=8, weight_granularity="per_channel", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True,
                options={"weights": "qint8", "activations": "qint8", **_CAL}))
register(Scheme("quanto-w4", "quanto", "optimum-quanto qint4 weights (groups of 128), activations fp",
                weight_bits=4, weight_granularity="group", options={"weights": "qint4", "group_size": 128}))
register(Scheme("quanto-fp8", "quanto", "optimum-quanto qfloat8 (e4m3) weights and calibrated activations",
                weight_bits=8, weight_granularity="per_channel", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True,
                options={"weights": "qfloat8", "activations": "qfloat8", **_CAL}))

# Outlier-aware post-training methods (issue 15).  A "transform" is an equivalence-preserving
# float rewrite applied before the quantizers named by the rest of the scheme; calibrated
# ones draw from the training split with the scheme's calibration seed (--calibration-seeds).
_SQ = {"transform": {"method": "smoothquant", "alpha": 0.5}}
register(Scheme("w8a8-sq", "simulated", "SmoothQuant (alpha 0.5, folded into the norms), then w8a8-dyn",
                weight_bits=8, weight_granularity="per_channel", activation_bits=8,
                activation_granularity="per_token", options={**_SQ, **_CAL}))
for _a in (0.25, 0.75, 0.85):
    register(Scheme(f"w8a8-sq-a{int(_a * 100)}", "simulated", f"w8a8-sq with SmoothQuant alpha {_a}",
                    weight_bits=8, weight_granularity="per_channel", activation_bits=8,
                    activation_granularity="per_token",
                    options={"transform": {"method": "smoothquant", "alpha": _a}, **_CAL}))
register(Scheme("w8a8-pt-sq", "static", "SmoothQuant (alpha 0.5), then the w8a8-pt protocol",
                weight_bits=8, weight_granularity="per_tensor", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True, options={**_PT, **_SQ}))
_HAD = {"transform": {"method": "hadamard"}}
register(Scheme("w8a8-had", "simulated",
                "residual stream rotated by a randomized Hadamard matrix (norms folded, QuaRot offline part; "
                "the draw seed seeds the signs), then w8a8-dyn",
                weight_bits=8, weight_granularity="per_channel", activation_bits=8,
                activation_granularity="per_token", options={**_HAD, "calibration_seed": 0}))
register(Scheme("w8a8-pt-had", "static", "Hadamard-rotated residual stream, then the w8a8-pt protocol",
                weight_bits=8, weight_granularity="per_tensor", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True, options={**_PT, **_HAD}))
register(Scheme("w4a8-had", "static", "Hadamard-rotated residual stream, then w4a8",
                weight_bits=4, weight_granularity="per_channel", activation_bits=8,
                activation_granularity="per_tensor", activation_static=True,
                options={**_PT, "weight_range": "mse", **_HAD}))
# groups of 64 as well: SmolLM2's width (576) is not a multiple of 128
for _g in (128, 64):
    register(Scheme(f"w4-gptq-g{_g}", "weight_only",
                    f"GPTQ 4-bit weights, asymmetric, groups of {_g} (damping 0.01)",
                    weight_bits=4, weight_granularity="group",
                    options={"method": "gptq", "group_size": _g, "symmetric": False, "percdamp": 0.01, **_CAL}))
    register(Scheme(f"w4-awq-g{_g}", "weight_only",
                    f"AWQ 4-bit weights (torchao's scale search, 20-point grid), asymmetric, groups of {_g}",
                    weight_bits=4, weight_granularity="group",
                    options={"method": "awq", "group_size": _g, "symmetric": False, "grid": 20, **_CAL}))
register(Scheme("w4-hqq-g64", "weight_only", "HQQ 4-bit weights (the hqq library, no calibration), groups of 64",
                weight_bits=4, weight_granularity="group", options={"method": "hqq", "group_size": 64}))

# KV-cache quantization (issue 23): `options["kv_cache"]` holds a KVCacheSpec (qbench.quant.kvcache),
# so a KV scheme composes with any weight/activation scheme and the schemes above keep their hashes.
# Alone it rides on the fp32 reference; no calibration draw.
from qbench.quant.kvcache import KVCacheSpec  # noqa: E402

_KIVI = {"key_axis": "channel", "group_size": 32, "residual": 128}
_KV = {  # name: (spec, what it is)
    **{f"kv{b}": (KVCacheSpec(b), f"{b}-bit K and V per token over the whole head, every token quantized")
       for b in (8, 4, 2)},
    **{f"kv{b}-sink1": (KVCacheSpec(b, sink=1), f"kv{b} with the first (sink) token's K and V exact (IntactKV)")
       for b in (8, 4, 2)},
    **{f"kv{b}-kivi-g32-r128": (KVCacheSpec(b, **_KIVI),
                                f"KIVI-{b}: keys per channel over groups of 32 tokens, values per token in groups of "
                                f"32 channels, the last 128 tokens exact") for b in (4, 2)},
    "kv2-kivi-g32-r128-sink1": (KVCacheSpec(2, sink=1, **_KIVI), "KIVI-2 with the sink token exact too"),
    # KIVI-2's parts one at a time: groups of 32 channels per token, then the 128-token window
    "kv2-g32": (KVCacheSpec(2, group_size=32), "2-bit K and V per token in groups of 32 channels"),
    "kv2-g32-r128": (KVCacheSpec(2, group_size=32, residual=128), "kv2-g32 with the last 128 tokens exact"),
    # per-channel keys with the shortest window they allow (a key group is quantized when complete)
    **{f"kv2-kivi-g32-r32{sink}": (KVCacheSpec(2, "channel", group_size=32, residual=32, sink=1 if sink else 0),
                                   f"KIVI-2 with a 32-token window{' and the sink token exact' if sink else ''}")
       for sink in ("", "-sink1")},
}
for _name, (_spec, _text) in _KV.items():
    register(Scheme(_name, "reference", _text, options={"kv_cache": _spec.to_options()}))
for _name in ("kv4", "kv4-sink1"):
    register(Scheme(f"w8a8-dyn-{_name}", "simulated", f"w8a8-dyn weights and activations, {_name} cache",
                    weight_bits=8, weight_granularity="per_channel", activation_bits=8,
                    activation_granularity="per_token", options={"kv_cache": _KV[_name][0].to_options()}))
