"""Backends, transforms and add-ons: handlers registered by name (torchao's config-handler
pattern).  `quantize()` looks a scheme's parts up here; nothing dispatches by if-chains.

A scheme is data, and a handler declares what of it it reads: the Scheme fields and the
option keys it honours, the versions it implements, and a `check` of their values.  A
Scheme whose field or option no handler it names would read is refused when it is defined
(`check_scheme`), so nothing in a result key is decorative.

Three kinds, one registry each:
  backend    scheme.backend: quantizes the model (weights, activations)
  transform  scheme.options["transform"]["method"]: a float rewrite run before the backend
  addon      a key of scheme.options (e.g. "kv_cache"): composes with any backend, run after it
Each handler's module registers it on import (`@register("backend", ...)`); MODULES names
that module, so a scheme can name a handler before its module (or an optional package it
needs at run time) is imported.  A new backend is one module plus its line in MODULES.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from qbench.suggest import closest

# calibration(n_batches, seed, batch_size) -> iterable of (B, T) token batches from the
# training split of the model's corpus.
CalibrationSource = Callable[[int, int, int], Iterable[torch.Tensor]]

KINDS = ("backend", "transform", "addon")
MODULES = {
    "backend": {"reference": "qbench.quant.reference", "simulated": "qbench.quant.simulated",
                "static": "qbench.quant.static", "weight_only": "qbench.quant.weight_only",
                "bitsandbytes": "qbench.quant.bnb", "quanto": "qbench.quant.quanto"},
    "transform": {"smoothquant": "qbench.quant.smoothquant", "hadamard": "qbench.quant.rotation"},
    "addon": {"kv_cache": "qbench.quant.kvcache"},
}
# Scheme fields no handler reads: identity and prose, kept out of the key (Scheme.key_json).
PROSE_FIELDS = ("name", "description")
# Fields every scheme has and check_scheme itself reads.
STRUCTURE_FIELDS = ("backend", "version", "options")
CALIBRATION_OPTIONS = frozenset({"calibration_batches", "calibration_seed", "calibration_batch_size"})


@dataclass(frozen=True)
class Handler:
    """What a backend, transform or add-on does and what of a scheme it reads.

    apply(model, scheme, calibration) -> facts (recorded with the result).
    fields: Scheme fields it honours (the others must keep their defaults; backends only).
    options: scheme.options keys it honours, or options(scheme) -> those (a transform: also
    the keys of its own dict, in `transform_keys`).  check(scheme) raises ValueError on
    values it cannot honour.
    follow_device: quantizer state created on the CPU is moved to the model's device after.
    devices: the device types it runs on (checked before any model loads; CPU only until
    someone has run it on a GPU).  package: what it needs beyond torch, a module name or
    package(scheme) -> name | None (e.g. one weight method needs a package of its own).
    family: what the report, the study and recheck call the method (default: its name);
    slow: minutes per cell, so `qbench recheck` samples it only with --slow; each also
    a function of the scheme (e.g. per weight method)."""
    kind: str
    name: str
    apply: Callable
    fields: frozenset = frozenset()
    options: frozenset | Callable = frozenset()
    transform_keys: frozenset = frozenset({"method"})
    check: Callable | None = None
    versions: tuple[int, ...] = (1,)
    follow_device: bool = False
    devices: tuple[str, ...] = ("cpu",)
    package: str | Callable | None = None
    # what it needs of the model's layout (qbench.modeling.families.NEEDS), or
    # requires(scheme) -> those; the planner refuses a family that lacks one (qbench.quant.support)
    requires: tuple[str, ...] | Callable = ()
    family: str | Callable = ""
    slow: bool | Callable = False

    def needs(self, scheme) -> str | None:
        return self.package(scheme) if callable(self.package) else self.package

    def reads(self, scheme) -> frozenset:
        """The scheme options it honours."""
        return frozenset(self.options(scheme)) if callable(self.options) else self.options

    def family_of(self, scheme) -> str:
        family = self.family(scheme) if callable(self.family) else self.family
        return family or self.name

    def is_slow(self, scheme) -> bool:
        return bool(self.slow(scheme) if callable(self.slow) else self.slow)

    def layout_needs(self, scheme) -> tuple[str, ...]:
        return tuple(self.requires(scheme)) if callable(self.requires) else self.requires


REGISTRY: dict[str, dict[str, Handler]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, *, fields: Iterable[str] = (), options: Iterable[str] | Callable = (),
             transform_keys: Iterable[str] = ("method",), check: Callable | None = None,
             versions: tuple[int, ...] = (1,), follow_device: bool = False,
             devices: Iterable[str] = ("cpu",), package: str | Callable | None = None,
             requires: tuple[str, ...] | Callable = (), family: str | Callable = "",
             slow: bool | Callable = False):
    """Decorator: register `apply` as the handler `name` of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown handler kind {kind!r}; one of {KINDS}")

    def decorate(apply: Callable) -> Callable:
        if name in REGISTRY[kind]:
            raise ValueError(f"{kind} {name!r} is registered twice")
        REGISTRY[kind][name] = Handler(kind, name, apply, frozenset(fields),
                                       options if callable(options) else frozenset(options),
                                       frozenset(transform_keys), check, tuple(versions), follow_device,
                                       tuple(devices), package, requires, family, slow)
        return apply
    return decorate


def get_handler(kind: str, name: str) -> Handler:
    """The registered handler, importing its module first if need be."""
    if name not in REGISTRY[kind] and name in MODULES[kind]:
        importlib.import_module(MODULES[kind][name])
    if name not in REGISTRY[kind]:
        raise KeyError(f"unknown {kind} {name!r}{closest(name, set(MODULES[kind]) | set(REGISTRY[kind]))}")
    return REGISTRY[kind][name]


def scheme_handlers(scheme) -> list[Handler]:
    """The handlers a scheme names, in the order they run: transform, backend, add-ons."""
    handlers = []
    transform = scheme.options.get("transform")
    if transform is not None:
        if not isinstance(transform, dict) or not isinstance(transform.get("method"), str):
            raise ValueError(f"scheme {scheme.name!r}: options['transform'] must be a dict with a 'method', "
                             f"got {transform!r}")
        handlers.append(get_handler("transform", transform["method"]))
    handlers.append(get_handler("backend", scheme.backend))
    for key in scheme.options:
        if key in MODULES["addon"] or key in REGISTRY["addon"]:
            handlers.append(get_handler("addon", key))
    return handlers


def check_scheme(scheme) -> None:
    """Refuse a scheme that says something its handlers would not do: a field changed from
    its default that the backend does not honour, an option key nobody reads, a version
    the backend does not implement, or values a handler's check rejects."""
    try:
        handlers = scheme_handlers(scheme)
    except KeyError as err:
        raise ValueError(f"scheme {scheme.name!r}: {err.args[0]}") from None
    backend = next(h for h in handlers if h.kind == "backend")
    if scheme.version not in backend.versions:
        raise ValueError(f"scheme {scheme.name!r}: backend {backend.name!r} implements version(s) "
                         f"{list(backend.versions)}, not {scheme.version!r}")
    for field in dataclasses.fields(scheme):
        if field.name in PROSE_FIELDS + STRUCTURE_FIELDS or field.name in backend.fields:
            continue
        if getattr(scheme, field.name) != field.default:
            raise ValueError(f"scheme {scheme.name!r}: backend {backend.name!r} does not honour "
                             f"{field.name}={getattr(scheme, field.name)!r}; leave it at {field.default!r} "
                             f"(it honours {sorted(backend.fields) or 'no optional fields'})")
    honoured = set().union(*(h.reads(scheme) for h in handlers))
    honoured |= {"transform"} if any(h.kind == "transform" for h in handlers) else set()
    honoured |= {h.name for h in handlers if h.kind == "addon"}
    unread = sorted(set(scheme.options) - honoured)
    if unread:
        raise ValueError(f"scheme {scheme.name!r}: no handler reads option(s) {unread} "
                         f"(backend {backend.name!r} and the rest read {sorted(honoured)})")
    for handler in handlers:
        if handler.kind == "transform":
            extra = sorted(set(scheme.options["transform"]) - handler.transform_keys)
            if extra:
                raise ValueError(f"scheme {scheme.name!r}: transform {handler.name!r} does not read {extra} "
                                 f"(it reads {sorted(handler.transform_keys)})")
        if handler.check is not None:
            handler.check(scheme)


def read_by_others(scheme) -> set[str]:
    """The option keys that the scheme's transform and add-ons read (a backend's check, which
    knows what its own method reads, leaves these alone)."""
    others = {"transform"} if "transform" in scheme.options else set()
    for handler in scheme_handlers(scheme):
        if handler.kind != "backend":
            others |= handler.reads(scheme) | ({handler.name} if handler.kind == "addon" else set())
    return others


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        return False


def check_devices(schemes, device: torch.device) -> None:
    """A UsageError (exit 2) naming every scheme that cannot run on `device` here (a handler
    not declared for the device type, or a package it needs missing), before any work."""
    from qbench.validate import UsageError

    problems = []
    for scheme in schemes:
        for handler in scheme_handlers(scheme):
            package = handler.needs(scheme)
            if device.type not in handler.devices:
                problems.append(f"{scheme.name} ({handler.name} runs on {', '.join(handler.devices)})")
            elif package and not _installed(package):
                problems.append(f"{scheme.name} (needs the {package.split('.')[0]} package, not installed here)")
            else:
                continue
            break
    if problems:
        raise UsageError(f"--device {device}: cannot run {'; '.join(problems)}; drop these schemes or install "
                         "the package (scripts/device_bundle.py carries them to a GPU machine)")


def calibration_batches(scheme, calibration: CalibrationSource | None) -> list[torch.Tensor]:
    """The scheme's calibration draw (its seed, batch count and batch size)."""
    if calibration is None:
        raise ValueError(f"scheme {scheme.name!r} is calibrated: pass calibration batches")
    o = scheme.options
    return list(calibration(o["calibration_batches"], o["calibration_seed"], o["calibration_batch_size"]))


def require(scheme, condition: bool, message: str) -> None:
    """A check's one-liner: ValueError naming the scheme when `condition` fails."""
    if not condition:
        raise ValueError(f"scheme {scheme.name!r}: {message}")


def require_options(scheme, keys: Iterable[str], why: str) -> None:
    missing = sorted(set(keys) - set(scheme.options))
    require(scheme, not missing, f"{why} needs option(s) {missing}")
