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
