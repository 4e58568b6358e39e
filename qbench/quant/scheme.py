"""Quantization schemes as data: frozen dataclasses with a version, a JSON round trip and a
stable hash (part of every result key), and a registry that names them."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from qbench.registry import closest


@dataclass(frozen=True)
class Scheme:
    name: str
    backend: str  # "reference" (no quantization) or "simulated" (qbench's own)
    description: str
    weight_bits: int | None = None
    weight_granularity: str | None = None  # "per_channel" | "per_tensor" | "group"
    activation_bits: int | None = None
    activation_granularity: str | None = None  # "per_token" | "per_tensor"
    activation_static: bool = False
    dtype: str = "float32"  # the compute dtype of everything left unquantized
    int8_matmul: bool = False  # real int8 x int8 -> int32 matmuls instead of fake quantization
    quantize_gates: bool = False
    version: int = 1
    options: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Scheme":
        return cls(**json.loads(text))

    def hash(self) -> str:
        """Stable across processes and machines: sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __hash__(self) -> int:  # options is a dict: hash by the canonical JSON instead
        return hash(self.to_json())

    def summary(self) -> str:
        if self.backend == "reference":
            return f"{self.dtype} reference, no quantization"
        weights = f"W{self.weight_bits} {self.weight_granularity}" if self.weight_bits else "weights fp"
        acts = (f"A{self.activation_bits} {self.activation_granularity} "
                f"{'static' if self.activation_static else 'dynamic'}") if self.activation_bits else "activations fp"
        path = "real int8 matmul" if self.int8_matmul else "simulated"
        return f"{weights}, {acts}, {path} [{self.backend}]"


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is registered twice")
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
    "w8a8-dyn-int8", "simulated",
    "w8a8-dyn computed with real int8 x int8 -> int32 matmuls (torch._int_mm)",
    weight_bits=8, weight_granularity="per_channel", activation_bits=8, activation_granularity="per_token",
    int8_matmul=True,
))
