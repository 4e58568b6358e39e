"""Where a cell runs: `qbench bench --device cpu|cuda|cuda:N`.  The device is provenance,
not part of a cell's key: the same cell measured on a GPU is the same experiment."""
from __future__ import annotations

import torch

from qbench.validate import UsageError


def resolve_device(text: str | None) -> torch.device:
    """A usable torch device, or a UsageError (exit 2) that says why not."""
    text = (text or "cpu").strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {text!r}: qbench runs on cpu or cuda devices")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device on this machine (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _inputs_to_device(module, args, kwargs):
    device = model_device(module)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return args, kwargs


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to `device` once; its forward then moves tensor inputs there too, so
    calibration batches, probe windows and lm-eval batches need no changes."""
    if model_device(model) != device:
        model.to(device)
    if not getattr(model, "_qbench_input_hook", False):
        model.register_forward_pre_hook(_inputs_to_device, with_kwargs=True)
        model._qbench_input_hook = True
    return model


# Where each quantization backend runs, and the package it needs beyond torch (checked
# before any model is loaded, so a sweep never dies half-way on a cell its device cannot
# run).  A backend missing here runs on the CPU only until someone has run it on a GPU.
BACKEND_DEVICES = {
    "reference": (("cpu", "cuda"), None),
    "simulated": (("cpu", "cuda"), None),  # torch ops; int8 GEMMs via torch._int_mm
    "static": (("cpu", "cuda"), None),
    "weight_only": (("cpu", "cuda"), None),  # RTN, GPTQ, AWQ in torch; HQQ's fit runs on the CPU
    "bitsandbytes": (("cpu", "cuda"), "bitsandbytes"),
    "quanto": (("cpu", "cuda"), "optimum.quanto"),
}
METHOD_PACKAGES = {"hqq": "hqq"}  # weight methods that need a package of their own


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        return False


def check_schemes_device(schemes, device: torch.device) -> None:
    """A UsageError (exit 2) naming every scheme that cannot run on `device` here (a backend
    not declared for the device type, or its package missing), before any work."""
    import importlib.util

    problems = []
    for scheme in schemes:
        devices, package = BACKEND_DEVICES.get(scheme.backend, (("cpu",), None))
        package = package or METHOD_PACKAGES.get(scheme.options.get("method", ""))
        if device.type not in devices:
            problems.append(f"{scheme.name} ({scheme.backend} runs on {', '.join(devices)})")
        elif package and not _installed(package):
            problems.append(f"{scheme.name} (needs the {package.split('.')[0]} package, not installed here)")
    if problems:
        raise UsageError(f"--device {device}: cannot run {'; '.join(problems)}; drop these schemes or install "
                         "the package (scripts/device_bundle.py carries them to a GPU machine)")
