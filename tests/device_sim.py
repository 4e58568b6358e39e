"""A CUDA device simulated on the CPU, so that CPU-only CI catches the bugs that only a GPU
run used to find: a tensor made on the CPU (a factory without `device=`, a `.cpu()`, a
fixed sample) meeting the model's tensors in one op.

    with SimulatedCuda() as sim:          # torch.cuda.is_available() is patched by the caller
        model.to("cuda")                  # parameters are *tagged* cuda:0; data stays on the CPU
        model(tokens)                     # tokens made on the CPU -> DeviceMismatch, as on a GPU

How: a TorchFunctionMode sees every torch call made from Python.  Tensors carry a tag,
"cuda" or "cpu": factories tag their output by their `device=` (none means the CPU, as on
a GPU machine), `.to()` / `.cuda()` / `.cpu()` retag a copy, `tensor.device` and
`tensor.is_cuda` answer from the tag, and any other op's output takes the tag of its
inputs.  An op whose inputs hold both a cuda and a CPU tensor (CPU scalars of 0 dimensions
excepted, as in torch) raises DeviceMismatch, like torch's "Expected all tensors to be on
the same device".  Tensors made outside the mode, or by autograd and C++ libraries, carry
no tag and never raise: the simulation catches what Python code creates, which is where
these bugs live.  It cannot run a library's own CUDA kernels (bitsandbytes, quanto).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

TAG = "_qbench_simulated_device"
CUDA = torch.device("cuda", 0)
_Base = torch._C.TensorBase


# torch accepts these with operands on two devices (a cross-device copy, CPU indices into a
# CUDA tensor, bookkeeping): their output keeps the first operand's device.
CROSS_DEVICE_OK = {"copy_", "__getitem__", "__setitem__", "_has_compatible_shallow_copy_type", "__set__"}


class DeviceMismatch(RuntimeError):
    pass


def _tag(t) -> str | None:
    return getattr(t, TAG, None) if isinstance(t, torch.Tensor) else None


def _set(out, tag: str | None):
    if tag is None:
        return out
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, TAG, tag)
            except (AttributeError, RuntimeError):
                pass
    return out


def _kind(device) -> str | None:
    """'cuda' / 'cpu' for a device-like argument, None for anything else (a dtype, say)."""
    if isinstance(device, torch.Tensor):
        return _tag(device) or "cpu"
    if isinstance(device, (str, torch.device)):
        try:
            return "cuda" if torch.device(device).type == "cuda" else "cpu"
        except RuntimeError:
            return None
    if isinstance(device, int) and not isinstance(device, bool):
        return "cuda"
    return None


def _real(device):
    """The real (CPU) stand-in for a device-like argument."""
    if isinstance(device, torch.Tensor):
        return device.dtype
    return "cpu" if _kind(device) else device


class SimulatedCuda(TorchFunctionMode):
    """See the module docstring.  `checked` counts the ops that saw a cuda-tagged input."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def __enter__(self):
        # nn.Parameter(data) is built in C++, out of the mode's sight: carry data's tag over
        # (deepcopy and module surgery build parameters this way)
        self._parameter_new = original = torch.nn.Parameter.__dict__["__new__"]

        def new(cls, data=None, requires_grad=True):
            return _set(original(cls, data, requires_grad), _tag(data))

        torch.nn.Parameter.__new__ = staticmethod(new)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__new__ = self._parameter_new
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        owner = getattr(func, "__self__", None)
        if owner is _Base.device:
            return CUDA if _tag(args[0]) == "cuda" else torch.device("cpu")
        if owner is _Base.is_cuda:
            return _tag(args[0]) == "cuda"
        if owner is _Base.data and getattr(func, "__name__", "") == "__set__":
            func(*args, **kwargs)  # param.data = new: the parameter takes the new tensor's place
            return _set(args[0], _tag(args[1]))
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and name in ("to", "cuda", "cpu"):
            return self._move(func, name, args, kwargs)
        if isinstance(first, torch.Tensor) and name == "numpy" and _tag(first) == "cuda":
            raise DeviceMismatch("can't convert a cuda:0 (simulated) tensor to numpy: call .cpu() first")
        if isinstance(first, torch.Tensor) and name == "get_device":
            return 0 if _tag(first) == "cuda" else -1
        target = None
        if "device" in kwargs:
            target = _kind(kwargs["device"])
            kwargs["device"] = _real(kwargs["device"]) if target else kwargs["device"]
        if name in CROSS_DEVICE_OK and isinstance(first, torch.Tensor):
            return _set(func(*args, **kwargs), _tag(first))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tags = {_tag(t) for t in tensors if not (_tag(t) == "cpu" and t.dim() == 0)} - {None}
        if "cuda" in tags:
            self.checked += 1
        if tags == {"cuda", "cpu"}:
            shapes = [(tuple(t.shape), _tag(t)) for t in tensors if _tag(t)]
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but {name} got tensors on "
                                 f"cuda:0 (simulated) and cpu: {shapes[:4]}")
        out = func(*args, **kwargs)
        if target:
            return _set(out, target)
        if "cuda" in tags:
            return _set(out, "cuda")
        if "cpu" in tags or not tensors:  # a factory without device= makes CPU tensors
            return _set(out, "cpu")
        return out

    def _move(self, func, name, args, kwargs):
        source = args[0]
        if name == "cuda":
            target, args, kwargs = "cuda", (source,), {k: v for k, v in kwargs.items() if k == "non_blocking"}
            real = lambda: source.clone()  # noqa: E731
        elif name == "cpu":
            target, real = "cpu", lambda: source.clone()  # noqa: E731
        else:
            target = _kind(kwargs.get("device"))
            for a in args[1:]:
                target = target or _kind(a)
            new_args = (source,) + tuple(_real(a) if _kind(a) else a for a in args[1:])
            new_kwargs = {k: (_real(v) if k == "device" and _kind(v) else v) for k, v in kwargs.items()}
            real = lambda: func(*new_args, **new_kwargs)  # noqa: E731
        out = real()
        if target is None:
            return _set(out, _tag(source))
        if out is source and _tag(source) != target:
            out = source.clone()  # a move makes a new tensor; the source stays where it was
        return _set(out, target)


def tag_model(model: torch.nn.Module, tag: str = "cuda") -> torch.nn.Module:
    """Tag a model loaded outside the mode as if `model.to('cuda')` had run."""
    for t in list(model.parameters()) + list(model.buffers()):
        setattr(t, TAG, tag)
    return model
