"""torch.compile within a run: a compiled function that falls back to eager, and dynamo's graph count.

Each run starts from a clean dynamo state (`fresh_start`), so a sweep in one process never hits the recompile
limit; a compile failure runs the function eagerly with one warning (`FallbackCompiled`); counting graphs lets
the trainer keep compile time out of the steady step time (`Lap`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BACKEND = "inductor"  # torch.compile's default; tests swap in a failing or a tracing-only backend

# torch settings patched around every compiled call, by config module. Past the recompile limit dynamo would run
# new shapes eagerly with a mere log line; failing instead makes it one warning and `compiled: false` in the
# summary. The backward is compiled with the forward (not at the first backward), so that its errors surface
# inside the fallback too. A key this torch lacks is left out; a `REQUIRED` one is refused up front
# (`check_compile_support`): without it a backward compile error would escape the fallback and fail the run.
PATCHES = {
    "torch._dynamo.config": {"fail_on_recompile_limit_hit": True},
    "torch._functorch.config": {"force_non_lazy_backward_lowering": True},
}
REQUIRED = ("force_non_lazy_backward_lowering",)


def fresh_start() -> None:
    """Forget every compiled graph and guard failure of earlier runs in this process."""
    torch._dynamo.reset()


def check_compile_support() -> None:
    """Refuse (ConfigError, one line) to compile on a torch that lacks a setting the eager fallback needs."""
    from hlb_gpt.config import ConfigError

    for module, settings in PATCHES.items():
        config = importlib.import_module(module)
        for key in settings:
            if key in REQUIRED and not hasattr(config, key):
                raise ConfigError(f"--compile needs {module}.{key}, which torch {torch.__version__} lacks: "
                                  "upgrade torch or use --no-compile")


@contextlib.contextmanager
def patched_settings():
    """`PATCHES` applied, leaving out the keys this torch does not have."""
    with contextlib.ExitStack() as stack:
        for module, settings in PATCHES.items():
            config = importlib.import_module(module)
            stack.enter_context(config.patch(**{k: v for k, v in settings.items() if hasattr(config, k)}))
        yield


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (never reset): a difference of two reads counts compiles."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def is_compile_error(exc: BaseException) -> bool:
    """An error of torch.compile itself (tracing, the backend, the recompile limit), not of the computation."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    return isinstance(exc, (TorchDynamoException, FailOnRecompileLimitHit))


class FallbackCompiled:
    """`fn` through torch.compile; after the first compile error, `fn` itself (eager), with one warning.

    torch.compile is lazy, so errors come from the first calls (and from recompiles; reaching dynamo's recompile
    limit counts as an error, where dynamo alone would quietly run the new shapes eagerly). The backward graph is
    compiled with the forward (not lazily at the first backward), so that its errors surface here too, before
    anything ran: the eager retry starts from untouched state. `dynamic_dims` are the dimensions of tensor
    arguments marked dynamic on every call (those a tensor has), so that new sizes along them reuse one graph,
    except where the size is the one `static_sizes` gives for that dimension: there it is marked static, so the
    size a run keeps for good (the full sequence length, after a warm-up) gets a graph of its own, specialised.
    `rebuild(error)`, if given, is asked first after a compile error: when it changes `fn` (a FlexAttention model
    to SDPA) it returns what it changed, `fn` is compiled again, and `rebuilt` says why.
    """

    def __init__(self, fn: Callable[..., Any], name: str, dynamic_dims: Sequence[int] = (),
                 static_sizes: dict[int, int] | None = None, rebuild: Callable[[str], str | None] | None = None,
                 **options: Any) -> None:
        self.fn, self.name = fn, name
        self.dynamic_dims = tuple(dynamic_dims)
        self.static_sizes = dict(static_sizes or {})
        self.rebuild = rebuild
        self.error: str | None = None
        self.rebuilt: str | None = None
        self._compiled = torch.compile(fn, backend=BACKEND, **options)

    def _mark(self, arg: Tensor) -> None:
        for dim in self.dynamic_dims:
            if dim >= arg.dim():
                continue
            if self.static_sizes.get(dim) == arg.shape[dim]:
                torch._dynamo.mark_static(arg, dim)
            else:
                # "maybe": a size-1 dimension (a last eval chunk of one) stays specialised, no error
                torch._dynamo.maybe_mark_dynamic(arg, dim)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.error is None:
            for arg in args:
                if isinstance(arg, Tensor):
                    self._mark(arg)
            try:
                with patched_settings():
                    return self._compiled(*args, **kwargs)
            except Exception as exc:
                if not is_compile_error(exc):
                    raise
                # The backend's own error is on the second line ("backend='inductor' raised:\nCppCompileError...").
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                error = f"{type(exc).__name__}: {' '.join(lines[:2])}"[:500]
                change = self.rebuild(error) if self.rebuild is not None and self.rebuilt is None else None
                if change is not None:
                    self.rebuilt = error
                    logger.warning("%s: torch.compile failed, compiling it again with %s (%s)", self.name, change,
                                   error)
                    return self(*args, **kwargs)
                self.error = error
                logger.warning("%s: torch.compile failed, running it eagerly from now on (%s)", self.name, self.error)
        return self.fn(*args, **kwargs)


def compile_record(asked: bool, errors: Sequence[str | None], graphs_at_start: int) -> dict[str, Any]:
    """The summary's compile fields: whether the run trained compiled (asked, and nothing fell back to eager),
    the graphs dynamo compiled since `graphs_at_start`, and the first compile error."""
    error = next((e for e in errors if e is not None), None)
    return {"compiled": asked and error is None, "compile_count": graphs_compiled() - graphs_at_start,
            "compile_error": error}


@dataclass
class Lap:
    """The training loop from one host sync to the next: where it started, and whether dynamo compiled since."""

    step: int
    tokens: int
    start: float
    graphs: int
    flops: float = 0.0

    @classmethod
    def begin(cls, loop: Any) -> Lap:
        """Start timing at the loop's current step, token and FLOP count (read right after a sync)."""
        return cls(loop.step, loop.tokens, time.perf_counter(), graphs_compiled(), loop.flops)

    def end(self) -> tuple[float, bool]:
        """(seconds since the start, whether a graph was compiled meanwhile); call it right after a sync."""
        return time.perf_counter() - self.start, graphs_compiled() > self.graphs
