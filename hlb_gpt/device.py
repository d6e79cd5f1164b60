"""The device a run trains on: choosing it, its precision and attention kernel, waiting for it, and what the run
holds in its memory. Nothing hard-codes a device: CUDA, then MPS, then the CPU, unless --device says.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from hlb_gpt.config import ConfigError
from hlb_gpt.grokfast import GradFilter

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available (use --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available (use --device auto)")
    return torch.device(name)


def resolve_precision(device: torch.device, precision: str) -> str:
    """What --precision means on this device: bf16 or fp32 (auto: bf16 on a CUDA device with native bf16, that is
    Ampere or newer; fp32 elsewhere). torch emulates bf16 on older cards, but Triton refuses it there, so a
    compiled run would fall back to eager."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    _say_no_native_bf16(torch.cuda.get_device_name(device))
    return "fp32"


@functools.lru_cache(maxsize=None)
def _say_no_native_bf16(name: str) -> None:
    """Once per device name and process: a sweep resolves the precision for every run."""
    logger.warning("%s has no native bf16: --precision auto trains in fp32 (--precision bf16 forces it)", name)


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA by default; on CPU it is opt-in (--precision bf16), which is how tests cover it."""
    if resolve_precision(device, precision) != "bf16":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def attention_for(choice: str, device: torch.device, compiled: bool, qk_dim: int) -> str:
    """The attention kernel a run uses: `auto` is flex on CUDA under torch.compile, sdpa otherwise.

    FlexAttention trains only on CUDA (torch has no CPU or MPS backward for it) and only pays off compiled:
    eagerly it runs an unfused reference that materialises every score. Its CUDA kernels need queries of at
    least 16 channels.
    """
    if choice == "auto":
        fits = device.type == "cuda" and compiled and qk_dim >= 16 and flex_available()
        return "flex" if fits else "sdpa"
    if choice == "flex":
        if not flex_available():
            raise ConfigError(f"--attention flex needs torch >= 2.5 with FlexAttention (this is {torch.__version__}); "
                              "use --attention sdpa")
        if device.type != "cuda":
            raise ConfigError(f"--attention flex needs a CUDA device: torch {torch.__version__} has no FlexAttention "
                              f"backward on {device.type} (use --attention sdpa or auto)")
        if qk_dim < 16:
            raise ConfigError(f"--attention flex needs queries of at least 16 channels, --width >= 128 "
                              f"(got {qk_dim}); use --attention sdpa")
    return choice


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class PeakMemory:
    """The peak memory of one run, measured from the run's start: what `kind` names, read by `read()`.

    A sweep runs many runs in one process, so a process-lifetime peak would give every run the peak of the
    largest run before it. `start` resets what can be reset: CUDA's peak statistics, or on Linux the kernel's
    high-water mark of the resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs). Elsewhere (macOS,
    or a kernel that refuses the reset) it falls back to the process's lifetime peak and `kind` says so.
    """

    device: torch.device
    kind: str

    @classmethod
    def start(cls, device: torch.device) -> PeakMemory:
        gc.collect()  # what earlier runs left in reference cycles is not this run's
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return cls(device, "cuda_max_memory_allocated")
        _return_freed_heap()
        if _reset_high_water_mark():
            return cls(device, "vm_hwm_since_run_start")
        return cls(device, "process_peak_rss")

    def read(self) -> int:
        if self.kind == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self.kind == "vm_hwm_since_run_start":
            return _high_water_mark()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if platform.system() == "Darwin" else rss * 1024


_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def _high_water_mark() -> int:
    """The process's peak resident set since its last reset, in bytes (VmHWM is given in kB)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{_STATUS} has no VmHWM line")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; the process's own C library
    except (OSError, AttributeError):
        return None  # musl, macOS, Windows: no such call


def _return_freed_heap() -> None:
    """Hand the heap pages earlier runs freed back to the OS. glibc keeps them resident: after a width-1024 run a
    process held 454 MB, 316 MB once trimmed, and the next run's high-water mark, reset to the resident set,
    would have started from the 138 MB it never used."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        _high_water_mark()
    except (OSError, ValueError):
        return False
    return True


def available_memory(device: torch.device) -> int | None:
    """Bytes a run on `device` may use at most: free memory on CUDA, physical memory on CPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def memory_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer, grad_filter: GradFilter,
                     peak: PeakMemory) -> dict[str, Any]:
    params = [p for p in model.parameters()]
    # Autograd allocates each gradient with its parameter's shape and dtype, so this is exact.
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    optimizer_state = tensor_bytes(v for s in optimizer.state.values() for v in s.values())
    state = {
        "params_bytes": tensor_bytes(params),
        "grads_bytes": grads,
        "optimizer_bytes": optimizer_state,
        "filter_bytes": grad_filter.nbytes,
    }
    total = sum(state.values())
    return {
        **state,
        # Frozen parameters (--lora-rank, --train-only) have no gradient, optimizer or filter state.
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "training_state_bytes": total,
        "filter_share": state["filter_bytes"] / total if total else 0.0,
        "peak_bytes": peak.read(),
        "peak_kind": peak.kind,
    }


def final_memory(measured: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                 grad_filter: GradFilter, peak: PeakMemory) -> dict[str, Any]:
    """The summary's memory record: the breakdown measured during the run (or now, if the run ended before it
    was), with the run's peak read at the end."""
    return {**(measured or memory_breakdown(model, optimizer, grad_filter, peak)),
            "peak_bytes": peak.read(), "peak_kind": peak.kind}


def format_memory(mem: dict[str, Any]) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
    return (
        f"memory: params {mb(mem['params_bytes'])}, grads {mb(mem['grads_bytes'])}, "
        f"optimizer {mb(mem['optimizer_bytes'])}, filter {mb(mem['filter_bytes'])} "
        f"({100 * mem['filter_share']:.1f}% of training state), peak {mb(mem['peak_bytes'])} ({mem['peak_kind']})"
    )
