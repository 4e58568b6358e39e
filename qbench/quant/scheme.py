"""Quantization schemes as data: frozen dataclasses with a version, a JSON round trip and a
stable hash of what computes (part of every result key), and a registry that names them,
built from the named schemes' data (qbench.scheme_catalog) and the schemes registered in code.

Every field is read by the backend (or transform, or add-on) the scheme names, or the
scheme is refused when it is defined (qbench.quant.handlers.check_scheme).  The name and
the description are prose: outside the key, so rewording one moves no record."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from qbench.quant.handlers import PROSE_FIELDS, check_scheme, scheme_handlers
from qbench.scheme_catalog import CATALOG
from qbench.scheme_catalog import add as add_to_catalog
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


def register(scheme: Scheme, label: str | None = None, tags=()) -> Scheme:
    """Add a scheme to the registry; one defined in code (not in qbench.scheme_catalog) enters
    the catalogue too, with its label and tags, so the report and the study show it."""
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is registered twice")
    same = [other.name for other in SCHEMES.values() if other.key_json() == scheme.key_json()]
    if same:
        raise ValueError(f"scheme {scheme.name!r} computes what {same[0]!r} computes (same key); "
                         "give it a field or option that differs, or use the existing one")
    entry = CATALOG.get(scheme.name)
    if entry is None:
        add_to_catalog(asdict(scheme), label, tags)
    elif Scheme(**entry.fields) != scheme or label is not None or tags:
        raise ValueError(f"scheme {scheme.name!r} is defined in qbench.scheme_catalog with other fields; "
                         "register it there, or under another name")
    SCHEMES[scheme.name] = scheme
    return scheme


def unregister(name: str) -> None:
    """Remove a scheme defined in code from the registry and the catalogue (tests)."""
    del SCHEMES[name]
    del CATALOG[name]


@dataclass(frozen=True)
class SchemeInfo:
    """What the registry says of a scheme beyond its fields: from its handlers the family
    (transform first, e.g. "smoothquant + static"; a weight-only scheme's weight method),
    the packages it needs beyond torch and whether a cell takes minutes; from the catalogue
    its label and tags (qbench.scheme_catalog)."""
    family: str
    bits: dict  # weights, activations, KV cache (None: full precision)
    label: str
    tags: tuple[str, ...]
    packages: tuple[str, ...]
    slow: bool


def scheme_info(scheme: Scheme | str) -> SchemeInfo:
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    handlers = scheme_handlers(scheme)
    spec = scheme.options.get("kv_cache") or {}
    entry = CATALOG.get(scheme.name)
    return SchemeInfo(family=" + ".join(h.family_of(scheme) for h in handlers),
                      bits={"weights": scheme.weight_bits, "activations": scheme.activation_bits,
                            "kv_cache": spec.get("bits")},
                      label=entry.label if entry else scheme.name, tags=entry.tags if entry else (),
                      packages=tuple(dict.fromkeys(p for h in handlers if (p := h.needs(scheme)))),
                      slow=any(h.is_slow(scheme) for h in handlers))


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise KeyError(f"unknown scheme {name!r}{closest(name, SCHEMES)}")
    return SCHEMES[name]


# The named schemes are data (qbench.scheme_catalog: fields, label, tags), built and checked here.
for _entry in CATALOG.values():
    register(Scheme(**_entry.fields))
