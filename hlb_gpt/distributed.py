"""Data parallelism under `torchrun`: which rank this is, and the few collectives the loop needs.

Without torchrun everything here is a no-op. NCCL on CUDA, gloo elsewhere (so tests run it on CPU). Where the
all-reduce falls in a step: docs/DESIGN.md, section 4.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hlb_gpt.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 0  # ranks on this node, as torchrun says (0: not said)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    return Dist(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 0)))


def rank_device(ctx: Dist, device: torch.device) -> torch.device:
    """This rank's device, made the current one: under torchrun on CUDA, the GPU of its local rank.

    More ranks on a node than it has GPUs is refused (ConfigError) on every rank before any touches a GPU, rather
    than each surplus rank failing in `set_device` with a traceback while the others wait for it.
    """
    if not ctx.enabled or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    ranks = max(ctx.local_world_size, ctx.local_rank + 1)
    if ranks > count:
        raise ConfigError(f"torchrun started {ranks} ranks on this node but it has {count} CUDA device"
                          f"{'s' if count != 1 else ''}: use --nproc_per_node={count} or fewer")
    device = torch.device("cuda", ctx.local_rank)
    torch.cuda.set_device(device)
    return device


def init(ctx: Dist, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device (`rank_device`)."""
    if not ctx.enabled:
        return device
    device = rank_device(ctx, device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group, if this process joined one: at exit, whether the job succeeded or a rank failed.

    A failing rank leaves at once, which ends the collectives its peers wait in (gloo's at once; NCCL's when
    torchrun, seeing the rank exit non-zero, stops the others), so one rank's failure ends the job promptly.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """The model under DDP. Its only buffer, the distance table, is constant: it is not re-sent every forward.
    Gradients are views into DDP's all-reduce buckets rather than a second copy of them."""
    # torch 2.13 renamed broadcast_buffers (and warns on the old name); torch 2.4 knows only the old one.
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _ddp_arguments()
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_buffer_sync)


def _ddp_arguments() -> set[str]:
    return set(inspect.signature(DistributedDataParallel).parameters)


def mean(t: Tensor, ctx: Dist) -> Tensor:
    """The mean over ranks (the value itself in a single process)."""
    if not ctx.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world_size


def gather_floats(value: float, ctx: Dist, device: torch.device) -> list[float]:
    if not ctx.enabled:
        return [value]
    out = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(ctx.world_size)]
    dist.all_gather(out, torch.tensor(value, dtype=torch.float64, device=device))
    return [t.item() for t in out]


def broadcast_flag(flag: bool, ctx: Dist, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (so all ranks stop, or checkpoint, together)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(obj: Any, ctx: Dist) -> Any:
    """Rank 0's (picklable) object, on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(flag: bool, ctx: Dist, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (on one process: itself)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@dataclass(frozen=True)
class _Sent:
    """A tensor's place in the structure `broadcast_tensors` sends ahead of the tensors themselves."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def broadcast_tensors(obj: Any, ctx: Dist, device: torch.device) -> Any:
    """Rank 0's nested state (dicts, lists and tuples of tensors and plain data) on every rank, its tensors sent one
    at a time through `device` as raw bytes: no rank holds a pickled copy of the whole, nor the whole on `device`.
    The other ranks get their tensors on the CPU, as `torch.load(map_location="cpu")` would give them."""
    if not ctx.enabled:
        return obj
    tensors: list[Tensor] = []
    skeleton = broadcast_object(_hollow(obj, tensors) if ctx.is_main else None, ctx)
    if ctx.is_main:
        for t in tensors:
            if t.numel():
                dist.broadcast(t.detach().contiguous().reshape(-1).view(torch.uint8).to(device), src=0)
        return obj
    return _fill(skeleton, device)


def _hollow(obj: Any, tensors: list[Tensor]) -> Any:
    """`obj` with each tensor replaced by its shape and dtype, the tensors appended to `tensors` in order."""
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return _Sent(tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _hollow(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_hollow(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, device: torch.device) -> Any:
    """The inverse of `_hollow` on a receiving rank: each tensor received in order, in the order `_hollow` met them."""
    if isinstance(obj, _Sent):
        out = torch.empty(obj.shape, dtype=obj.dtype)
        if out.numel():
            received = torch.empty(out.numel() * out.element_size(), dtype=torch.uint8, device=device)
            dist.broadcast(received, src=0)
            out.reshape(-1).view(torch.uint8).copy_(received)
        return out
    if isinstance(obj, dict):
        return {k: _fill(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, device) for v in obj)
    return obj


def on_rank0(fn: Callable[[], T], ctx: Dist) -> T:
    """`fn()` run by rank 0 alone, its result given to every rank: decisions read from rank 0's disk hold on every
    node, shared filesystem or not. An exception raised on rank 0 is raised on every rank, so none waits."""
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise error
    return result
