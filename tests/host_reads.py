"""Counting the reads of a tensor's value back to the host: each one is a host sync on an accelerator.

On CUDA, `torch.cuda.set_sync_debug_mode("error")` catches every sync. The CPU has none to catch, so `HostReads`
records the calls that would be one: a scalar read (`.item()`, `bool()`, `float()`: `aten._local_scalar_dense`),
ops whose output size depends on the values (`nonzero`, `equal`, ...), and copies out as Python or NumPy data.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Dispatcher ops that wait for the device's result before they return.
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "equal", "masked_select", "_unique", "unique_dim", "_unique2",
               "unique_consecutive")
# Tensor methods that hand the values to Python.
COPYING_OUT = ("tolist", "numpy", "cpu")


class _Ops(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING_OPS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _Methods(TorchFunctionMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in COPYING_OUT:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


class HostReads:
    """`with HostReads() as reads:` ... then `reads.seen` lists every host read in the block, in order."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._modes = (_Methods(self.seen), _Ops(self.seen))

    def __enter__(self) -> HostReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
