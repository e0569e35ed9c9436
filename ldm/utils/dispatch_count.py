"""Counting what a piece of code asks of the device: ATen operators dispatched, and host synchronisations.

Both are CPU-measurable proxies for how a training step behaves on an accelerator, where every
dispatched operator that launches a kernel costs a few microseconds of host time, and every read of a
device value back to the host (``.item()``, ``bool(t)``, ``.tolist()`` ...) stalls the host until the
device has finished all queued work — so the host can no longer run ahead of the device.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that only make a new view of existing storage (or no-ops): no kernel launch on a GPU.
_VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "unsqueeze", "squeeze",
             "split", "split_with_sizes", "chunk", "unbind", "slice", "select", "detach", "alias", "reshape",
             "_reshape_alias", "view_as", "expand_as", "flatten", "unflatten", "narrow", "lift_fresh",
             "_to_copy_noop", "is_same_size", "empty", "empty_like", "empty_strided", "new_empty",
             "new_empty_strided", "_local_scalar_dense", "clone_noop"}


def _op_name(func: Any) -> str:
    return func.overloadpacket.__name__.rstrip("_") if hasattr(func, "overloadpacket") else str(func)


class OpCounter(TorchDispatchMode):
    """Counts ATen operators dispatched while active (forward, autograd's backward and optimiser alike).

    ``total`` counts every operator; ``kernels`` leaves out views and allocations, which launch nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[_op_name(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in _VIEW_OPS)


def _targets_cpu(args: tuple, kwargs: dict) -> bool:
    # Only an explicit "cpu" is a read-back: a torch.device argument is how code moves data to the module's
    # own device (a no-op, or a host-to-device copy, on an accelerator), which a CPU run cannot tell apart.
    return any(isinstance(a, str) and a.startswith("cpu") for a in (*args, kwargs.get("device")))


class SyncCounter(TorchFunctionMode):
    """Counts calls that read a device value back to the host (a device synchronisation on a GPU).

    Counted: ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()`` / ``.to("cpu")`` (the string),
    ``bool``/``float``/``int`` of a tensor (an ``if`` on a tensor), ``nonzero``, boolean-mask indexing,
    ``masked_select``, ``unique``, ``equal``/``allclose``/``is_nonzero``, and ``repeat_interleave`` without
    ``output_size``: every call whose result depends on device values the host must wait for. ``calls``
    lists them by name; ``where`` keeps the innermost frames of each (to find them).
    """

    _READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
              torch.masked_select, torch.Tensor.masked_select, torch.unique, torch.Tensor.unique, torch.equal,
              torch.allclose, torch.Tensor.allclose, torch.is_nonzero, torch.Tensor.is_nonzero}

    def __init__(self, record_where: bool = False) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.record_where = record_where
        self.where: list[str] = []

    def _count(self, name: str) -> None:
        self.calls[name] += 1
        if self.record_where:
            import traceback

            frames = [f for f in traceback.extract_stack()[:-3] if "dispatch_count" not in f.filename]
            self.where.append(f"{name} at " + " <- ".join(f"{f.filename}:{f.lineno}" for f in frames[-7:][::-1]))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._READS:
            self._count(getattr(func, "__name__", str(func)))
        elif func is torch.Tensor.to and _targets_cpu(args[1:], kwargs):
            self._count("to(cpu)")
        elif func is torch.Tensor.__getitem__ and len(args) > 1 and _bool_index(args[1]):
            self._count("boolean-mask index")
        elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and kwargs.get("output_size") is None \
                and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self._count("repeat_interleave")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostCopyCounter(TorchDispatchMode):
    """Records blocking copies from the CPU to another device (``_to_copy``/``copy_`` whose source is on the CPU):
    on CUDA each one synchronises the host with the copy. Asynchronous copies (``non_blocking``, which the
    framework makes from pinned memory: ``ldm.utils.transfer``) are not counted. Works without a GPU under
    ``torch._subclasses.FakeTensorMode`` with tensors on a fake ``cuda`` device (enter this mode inside it)."""

    def __init__(self, record_where: bool = False) -> None:
        super().__init__()
        self.copies: list[str] = []
        self.record_where = record_where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name == "_to_copy":
            src, dst = args[0], kwargs.get("device")
            moving = dst is not None and torch.device(dst).type != "cpu"
        elif name == "copy":  # copy_ (the trailing underscore is stripped)
            dst, src = args[0], args[1]
            moving = isinstance(dst, torch.Tensor) and dst.device.type != "cpu"
        else:
            moving = False
        blocking = not (kwargs.get("non_blocking") or (name == "copy" and len(args) > 2 and args[2]))
        if moving and blocking and isinstance(src, torch.Tensor) and src.device.type == "cpu":
            self.copies.append(f"{name} {tuple(src.shape)} {src.dtype}" + (self._where() if self.record_where else ""))
        return func(*args, **kwargs)

    @staticmethod
    def _where() -> str:
        import traceback

        frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename
                  and "dispatch_count" not in f.filename]
        return " at " + " <- ".join(f"{f.filename}:{f.lineno}" for f in frames[-4:][::-1])
