"""The trainer: one loop for every task. It builds a run from a `RunConfig` and its `Task`, steps, evaluates,
checkpoints, and records.

The task (`hlb_gpt.tasks`) owns what differs between runs: the model, the optimizer, the batches and their
sampler, the loss, the evaluation and its extra columns, the epoch and when to stop early. The trainer owns the
rest, once: the order of one optimizer step (`optimizer_step`), log points, checkpoints and resuming, stop
signals, divergence, the status, the summary, the progress bar, the memory report and DDP. Everything that needs
a host sync (reading losses, norms, timers) happens only at sync points, so the device runs ahead between them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import platform
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import hlb_gpt
from hlb_gpt import components, distributed, footprint
from hlb_gpt.checkpoint import (CheckpointError, CorruptCheckpoint, FileStamp, checkpoint_dir, list_checkpoints,
                                load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from hlb_gpt.compiling import (FallbackCompiled, Lap, check_compile_support, compile_record, fresh_start,
                               graphs_compiled)
from hlb_gpt.config import ConfigError, RunConfig, check_resumable
from hlb_gpt.device import (PeakMemory, autocast_for, available_memory, final_memory, format_memory, memory_breakdown,
                            resolve_device, resolve_precision, synchronize)
from hlb_gpt.flops import peak_flops, throughput
from hlb_gpt.grokfast import GradFilter, NoFilter
from hlb_gpt.locks import RunLock
from hlb_gpt.profiling import StepProfiler, profile_window
from hlb_gpt.records import RecordWriteError, RunWriter
from hlb_gpt.tasks import Batch
from hlb_gpt.tracking import NoTracker, make_tracker

logger = logging.getLogger(__name__)

# How often the progress bar reads the loss (one host sync each time) when no evaluation falls due.
REFRESH_STEPS = 20
# tqdm's line without its own rate, which counts steps: the postfix gives tokens/s, the figure runs are compared by.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class Diverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- the task


class Task(Protocol):
    """What one kind of run supplies to the trainer; its component (`components.TASKS`) names its class.

    The class is built as `Task(cfg, device, ddp, compile)`: it checks its settings and loads its data, and
    writes nothing (a ConfigError here leaves no run folder). The trainer then seeds torch with `cfg.seed` and
    asks, in this order, for the model, the optimizer, `begin` (once its checkpoint, if any, is restored),
    and at every step a batch and its loss.
    """

    n_train: int
    """Items in one epoch: training tokens (lm), training equations (modular). `tokens` and `epoch` count them."""
    precision: str
    """The autocast precision the run trains with, resolved: "bf16" or "fp32"."""
    dynamic_dims: tuple[int, ...]
    """The input dimensions whose size varies between steps, so that one compiled graph serves them all."""
    static_sizes: dict[int, int]
    """Sizes of dynamic dimensions compiled static: the size a dimension keeps once it stops varying."""
    sampler: Any
    """The batch sampler, whose `state_dict()`/`load_state_dict()` a checkpoint holds."""
    data_source: str
    attention: str | None
    """The attention kernel config.json records as resolved, if the task's model has a choice."""
    text_sha256: dict[str, str] | None
    """The sha256 of each split's text, when the data is text: a run resumes only on the same text."""

    @staticmethod
    def planned_steps(cfg: RunConfig, n_train: int) -> int:
        """The steps a run of `cfg` takes, from the config alone and `n_train` (before or after the run)."""

    @staticmethod
    def count_params(cfg: RunConfig) -> int:
        """How many parameters the run trains (and filters), without building the model in memory: all of them,
        unless fine-tuning freezes some."""

    @staticmethod
    def vocab_size(cfg: RunConfig) -> int:
        """The classes the model's head scores (its logits per token), for the memory estimate."""

    @staticmethod
    def check(cfg: RunConfig, device: torch.device, compile: bool) -> None:
        """Refuse (ConfigError), before a sweep writes anything, settings the device cannot train with."""

    def build_model(self) -> nn.Module:
        """The model, on the device. Its trainable parameters (requires_grad) are the ones trained and filtered."""

    def begin(self, model: nn.Module, run_dir: Path, resumed: bool) -> None:
        """Called once it is known whether the run resumed from its checkpoint (`resumed`) or starts afresh,
        before anything steps: a fresh fine-tune loads its base's weights into `model` here, so that a resumed
        one never reads its base again."""

    def build_optimizer(self, named_params: list[tuple[str, nn.Parameter]]) -> tuple[Any, Any]:
        """(optimizer, lr scheduler) over the trainable parameters. The optimizer may honour `found_inf` to skip
        a non-finite step on the device (see `skips_on_device`)."""

    def describe(self, total_steps: int) -> str:
        """The data and the steps, for the line that starts a run."""

    def record(self) -> dict[str, Any]:
        """Entries config.json adds for this task."""

    def batch(self, step: int) -> Batch:
        """The batch of the step after `step` steps: every rank asks, and takes its share."""

    def loss(self, model: Callable[..., Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The mean loss of one micro-batch through `model` (the task's model, maybe wrapped by DDP and
        compiled), under autocast."""

    def evaluate(self, model: Callable[..., Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
        """{"val_loss": ..., then any extra metrics columns} (rank 0 alone evaluates, not through DDP)."""

    def evaluate_end(self, model: Callable[..., Tensor],
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Any]:
        """Entries summary.json adds once a run completes, evaluated then (the LM's --eval-test); rank 0 alone."""

    def should_stop(self, row: dict[str, Any]) -> str | None:
        """Why the run ends after the evaluation that wrote `row` (a target reached), or None to go on."""

    def summary(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """Entries summary.json adds for this task, from the run's metrics rows."""

    def state_dict(self) -> dict[str, Any]:
        """The task's own counters, checkpointed beside the loop's (names other than `LoopState`'s fields)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s counters from a checkpoint's loop state (which also holds the loop's)."""


def task_type(cfg: RunConfig) -> type[Task]:
    return components.TASKS[cfg.task].load()


def planned_steps(cfg: RunConfig, n_train: int) -> int:
    """The steps a run of `cfg` takes on `n_train` training items (tokens, equations)."""
    return task_type(cfg).planned_steps(cfg, n_train)


def eval_due(tokens_before: int, tokens_after: int, tokens_per_eval: float) -> bool:
    return math.floor(tokens_after / tokens_per_eval) > math.floor(tokens_before / tokens_per_eval)


# ----------------------------------------------------------------------------------------------- parts


def build_filter(cfg: RunConfig, named_params: list[tuple[str, nn.Parameter]], compile: bool) -> GradFilter:
    """The Grokfast filter of the run; a no-op object when it is off, so the step has no branch for it."""
    if not cfg.grokfast:
        return NoFilter()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "param": None}[cfg.filter_dtype]
    return components.filter_of(vars(cfg)).build(cfg, named_params, dtype, compile)


def count_params(cfg: RunConfig) -> int:
    """How many parameters the run trains, from its model built on the meta device: no memory, no
    initialisation."""
    return task_type(cfg).count_params(cfg)


def compiles(cfg: RunConfig, device: torch.device) -> bool:
    """Whether the run compiles its model: --compile, or by default on CUDA; ConfigError if this torch cannot."""
    compile_ = device.type == "cuda" if cfg.compile is None else cfg.compile
    if compile_:
        check_compile_support()
    return compile_


def check_attention(cfg: RunConfig) -> None:
    """Refuse, before a sweep writes anything, an attention kernel the run's device cannot train with."""
    device = resolve_device(cfg.device)
    task_type(cfg).check(cfg, device, compiles(cfg, device))


def memory_estimate(cfg: RunConfig, device: torch.device, world_size: int = 1) -> footprint.Footprint:
    """The memory one rank of a run of `cfg` holds at its peak step on `device`, from the config alone."""
    return footprint.estimate(cfg, count_params(cfg), task_type(cfg).vocab_size(cfg),
                              resolve_precision(device, cfg.precision), compiles(cfg, device), world_size)


def check_memory(cfg: RunConfig) -> None:
    """Refuse, before any work, a run whose peak step cannot fit in its device's memory: the MA filter allocates
    its (window + 1) copies of the parameters only at the first step, after the activations of that step.

    Under torchrun each rank checks its own device, made current first (`distributed.rank_device`, which also
    refuses more ranks than GPUs), so no rank reads another's memory or starts a context on GPU 0."""
    ddp = distributed.from_env()
    device = distributed.rank_device(ddp, resolve_device(cfg.device))
    available = available_memory(device)
    if available is None:
        return
    need = memory_estimate(cfg, device, ddp.world_size)
    if need.total > available:
        raise ConfigError(footprint.refusal(cfg, need, count_params(cfg), available, device))


def check_disk(configs: list[RunConfig], run_dirs: list[Path]) -> None:
    """Refuse, before any work, checkpoints that cannot fit on the disk of the runs' folders: each run keeps
    --keep-checkpoints of them and writes the next beside them; an MA filter's ring makes each one large. The
    runs' checkpoints already on disk count as free: they are replaced. Only rank 0 writes, so only it checks."""
    if not distributed.from_env().is_main:
        return
    sizes = [footprint.checkpoint_bytes(cfg, count_params(cfg)) if cfg.checkpoint_cadence else 0 for cfg in configs]
    need = sum(cfg.keep_checkpoints * size for cfg, size in zip(configs, sizes)) + max(sizes, default=0)
    if not need:
        return
    probe = Path(run_dirs[0]).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free + sum(p.stat().st_size for d in run_dirs for p in list_checkpoints(d))
    if need > free:
        gib = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
        runs = f" for each of {len(configs)} runs" if len(configs) > 1 else ""
        raise ConfigError(
            f"the checkpoints need about {gib(need)} of disk ({gib(max(sizes))} each: --keep-checkpoints "
            f"{max(cfg.keep_checkpoints for cfg in configs)}{runs}, and one being written), more than the "
            f"{gib(free)} free under {probe}; use --keep-checkpoints 1, fewer runs per --out, a smaller --window or "
            f"--checkpoint-every 0 (no checkpoints)")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer honours `optimizer.found_inf` itself: fused AdamW, and those that say so in a
    `skips_on_device` attribute (GrokAdamW; Muon beside fused AdamW)."""
    return bool(optimizer.defaults.get("fused") or getattr(optimizer, "skips_on_device", False))


def nonfinite_fallback(model: nn.Module, found_inf: Tensor, length: int, step: int) -> str | None:
    """What the model changed after non-finite gradients at a step of sequences of `length` (a FlexAttention
    model: SDPA below one block), or None: the step then counts towards divergence like any other. Reads
    `found_inf` only for a model that has a fallback, so other runs pay no read for it."""
    fallback = getattr(model, "nonfinite_fallback", None)
    return fallback(length, step) if fallback is not None and found_inf.item() else None


@dataclass
class StepResult:
    loss: Tensor  # mean over the micro-batches
    grad_norm: Tensor  # global, before the filter
    found_inf: Tensor  # 1.0 when the step was skipped for non-finite gradients
    ema_ratio: Tensor | None  # the filter's ‖mu‖/‖g‖, when measured


def optimizer_step(
    forward: Callable[[Tensor, Tensor], Tensor],
    micro_batches: list[tuple[Tensor, Tensor]],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_filter: GradFilter,
    clip: float | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    measure: bool = False,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> StepResult:
    """One optimizer step, in one fixed order; every value it returns stays on the device.

    backward over micro-batches → (DDP all-reduce happens inside backward) → non-finite check → Grokfast filter
    → optional clip → optimizer step → schedule step → zero grads. With `measure`, the filter's ‖mu‖/‖g‖ is
    taken right after it acts (the gradients are gone afterwards): only steps that end at a logging point ask.
    """
    loss_sum = None
    for i, (x, y) in enumerate(micro_batches):
        # Under DDP, gradients are all-reduced once, in the last micro-batch's backward.
        with no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
            with autocast():
                loss = forward(x, y)
            (loss / len(micro_batches)).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    # A 0/1 tensor rather than a bool: the filter and the optimizer skip on device, with no host sync.
    found_inf = (~torch.isfinite(grad_norm)).float()
    ratio = None
    on_device = skips_on_device(optimizer)
    if on_device or not found_inf.item():  # optimizers that cannot skip on device pay one sync per step
        grad_filter.step(found_inf if on_device else None)
        ratio = grad_filter.ratio() if measure else None
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        if on_device:
            optimizer.found_inf = found_inf
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum / len(micro_batches), grad_norm, found_inf, ratio)


# ----------------------------------------------------------------------------------------------- the run


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stopped at a step boundary after writing a checkpoint."""


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


class RunStatus:
    """The status a run's summary records, set by how the block it guards ends: "completed"; "diverged", recorded
    and swallowed so that a sweep goes on to its next run; "interrupted" or "failed", recorded and re-raised."""

    def __init__(self, name: str, say: Callable[[str], Any]) -> None:
        self.status, self.error = "completed", None
        self._name, self._say = name, say

    def __enter__(self) -> RunStatus:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is None:
            return False
        if issubclass(exc_type, Diverged):
            self.status, self.error = "diverged", str(exc)
            self._say(f"{self._name}: diverged: {exc}")
            return True
        if issubclass(exc_type, Exception):
            self.status, self.error = "failed", f"{exc_type.__name__}: {exc}"
        else:  # KeyboardInterrupt, SystemExit: stopped from outside, and never "completed"
            self.status, self.error = "interrupted", str(exc) or exc_type.__name__
        return False


@dataclass
class LoopState:
    """The loop's counters: with the model, optimizer, filter and the task's sampler and counters, all a resumed
    run needs."""

    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    wall_time: float = 0.0
    best: float = math.nan
    final: float = math.nan
    # Steady time: the loop's intervals between host syncs in which nothing was compiled. Intervals in which
    # dynamo compiled (the first steps, a new shape) count as compile time instead; train_time holds both.
    steady_time: float = 0.0
    steady_steps: int = 0
    steady_tokens: int = 0
    compile_time: float = 0.0
    flops: float = 0.0  # training FLOPs so far (`Batch.flops`), and those of the steady intervals; NaN if uncounted
    steady_flops: float = 0.0
    mark_tokens: int = 0  # steady tokens and time at the last metrics row
    mark_time: float = 0.0
    loss_count: int = 0
    # Device-side, read only at logging points.
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros(()))
    bad_run: Tensor = field(default_factory=lambda: torch.zeros(()))  # consecutive non-finite steps
    diverged_at: Tensor = field(default_factory=lambda: torch.full((), -1.0))  # step it exceeded the limit

    def to(self, device: torch.device) -> LoopState:
        for name in ("loss_sum", "bad_run", "diverged_at"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def metrics_row(self, n_train: int, train_loss: float, val_loss: float, lr: float, grad_norm: float,
                    ema_ratio: float) -> dict[str, Any]:
        """The metrics.jsonl row every task writes, at the current step (`ema_ratio` NaN when no filter acts).
        Records the validation loss as the final and maybe best one once training began (the step-0 evaluation
        reads the untrained model), and starts the next throughput interval."""
        if self.step > 0:
            self.final = val_loss
            self.best = val_loss if math.isnan(self.best) else min(self.best, val_loss)
        interval = self.steady_time - self.mark_time
        row = {
            "epoch": self.tokens / n_train,
            "step": self.step,
            "tokens": self.tokens,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "ema_ratio": None if math.isnan(ema_ratio) else ema_ratio,
            "time_s": self.train_time,
            "tokens_per_s": (self.steady_tokens - self.mark_tokens) / interval if interval > 0 else None,
        }
        self.mark_tokens, self.mark_time = self.steady_tokens, self.steady_time
        return row

    def add_lap(self, lap: Lap, profiled: bool = False) -> None:
        """Count the training time of the loop since its last host sync, as steady or as compile time; a traced
        interval (--profile) is neither: the profiler's overhead is not the run's speed."""
        seconds, compiled = lap.end()
        self.train_time += seconds
        if compiled:
            self.compile_time += seconds
        elif not profiled:
            self.steady_time += seconds
            self.steady_steps += self.step - lap.step
            self.steady_tokens += self.tokens - lap.tokens
            self.steady_flops += self.flops - lap.flops

    def add_evaluation(self, lap: Lap) -> None:
        """Count an evaluation that compiled a graph (the one before training, the first at a new shape) as compile
        time; other evaluations are not training time. Call it right after a sync (evaluations end with one)."""
        seconds, compiled = lap.end()
        if compiled:
            self.train_time += seconds
            self.compile_time += seconds

    def steady_marks(self) -> tuple[int, int, float, float]:
        """(steps, tokens, FLOPs, seconds) of the steady intervals so far: a rate is the difference of two."""
        return self.steady_steps, self.steady_tokens, self.steady_flops, self.steady_time

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LoopState:
        """The loop's counters from a checkpoint's loop state, which also holds the task's. A checkpoint written
        before FLOPs were counted leaves them unknown (NaN) for the rest of the run, rather than undercounted."""
        state = {"flops": math.nan, "steady_flops": math.nan, **state}
        return cls(**{f.name: state[f.name] for f in fields(cls)})


@dataclass
class Resumable:
    """What a checkpoint holds besides the loop counters and metrics: saved and restored in one place."""

    cfg: RunConfig
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_filter: GradFilter
    task: Task
    saved_at: int = -1  # the step of the checkpoint last written or resumed from
    saved_clock: float = field(default_factory=lambda: checkpoint_clock())  # when it was, or the run (re)started

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state(self, loop: LoopState, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "filter": self.grad_filter.state_dict(),
            "sampler": self.task.sampler.state_dict(), "loop": {**loop.state_dict(), **self.task.state_dict()},
            "rng": rng_state(self.device), "metrics": metrics,
            **({"text_sha256": self.task.text_sha256} if self.task.text_sha256 is not None else {}),
        }

    def start(self, resume: bool) -> tuple[LoopState, list[dict[str, Any]], Path | None]:
        """(loop counters, metrics so far, checkpoint resumed from): a fresh start, or with `resume` the state of
        the run's latest checkpoint if it has one, after checking that it was trained with these settings."""
        self.saved_clock = checkpoint_clock()
        ctx, found = distributed.from_env(), {}

        def newest() -> FileStamp | None:
            path, found["state"] = self._newest_intact() if resume else (None, None)
            return None if path is None else FileStamp.of(path)

        # Rank 0 reads its disk and names what it found: ranks on nodes without a shared filesystem agree. Ranks
        # that see the same file load it themselves; otherwise rank 0 sends it a tensor at a time. Never pickled
        # whole: an MA filter's ring makes a checkpoint tens of GB.
        stamp = distributed.on_rank0(newest, ctx)
        if stamp is None:
            return LoopState(), [], None
        checkpoint, saved = stamp.path, found.get("state")
        if distributed.all_true(ctx.is_main or stamp.visible(), ctx, self.device):
            saved = saved if ctx.is_main else load_checkpoint(checkpoint)
        else:
            saved = distributed.broadcast_tensors(saved, ctx, self.device)
        check_resumable(self.cfg, saved["config"], self.run_dir)
        before, now = saved.get("text_sha256"), self.task.text_sha256
        if before is not None and now is not None and before != now:
            split = next(k for k in now if before.get(k) != now[k])
            raise ConfigError(f"{self.run_dir} was trained on other text (sha256 of its {split} split "
                              f"{str(before.get(split))[:12]}…, now {now[split][:12]}…): point "
                              "--data-dir or --dataset at the data it was trained on")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.grad_filter.load_state_dict(saved["filter"])
        self.task.sampler.load_state_dict(saved["sampler"])
        set_rng_state(saved["rng"], self.device)
        loop = LoopState.from_state_dict(saved["loop"])
        self.task.load_state_dict(saved["loop"])
        self.saved_at = loop.step
        return loop, saved["metrics"], checkpoint

    def _newest_intact(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The newest checkpoint that loads, and its state. A corrupt or truncated one is set aside (renamed, not
        deleted) with a warning, and the one before it is tried; if none is left intact, the run cannot resume."""
        found = list_checkpoints(self.run_dir)
        for path in reversed(found):
            try:
                return path, load_checkpoint(path)
            except CorruptCheckpoint as exc:
                path.replace(path.with_name(path.name + ".corrupt"))
                logger.warning("%s; set aside as %s.corrupt, resuming from the checkpoint before it", exc, path.name)
        if found:
            raise CheckpointError(f"every checkpoint of {self.run_dir} is corrupt or truncated (set aside as *.corrupt);"
                                  f" remove {checkpoint_dir(self.run_dir)} to train the run from the start")
        return None, None

    def time_due(self) -> bool:
        """Whether a time cadence (--checkpoint-every 30m) has passed since the last checkpoint or the (re)start.
        Loops ask only at their sync points; an epoch cadence they decide from tokens. Under DDP only rank 0's
        answer counts: it alone saves, and saving holds no collective."""
        seconds = self.cfg.checkpoint_cadence.seconds
        return seconds > 0 and checkpoint_clock() - self.saved_clock >= seconds

    def gap_passed(self) -> bool:
        """Whether an epoch checkpoint may be written: the cadence's least gap (the default cadence's, on a corpus
        of a few steps an epoch) has passed since the last checkpoint or the (re)start."""
        return checkpoint_clock() - self.saved_clock >= self.cfg.checkpoint_cadence.min_seconds

    def save(self, loop: LoopState, metrics: list[dict[str, Any]], reason: str, say: Callable[[str], Any]) -> None:
        """Checkpoint this step, unless it already is or --checkpoint-every is 0. A write that fails (a full disk)
        is reported and training goes on: the previous checkpoint is intact."""
        if not self.cfg.checkpoint_cadence or self.saved_at == loop.step:
            return
        self.saved_at = loop.step
        try:
            save_checkpoint(self.run_dir, loop.step, self.state(loop, metrics), keep=self.cfg.keep_checkpoints)
        except OSError as exc:
            say(f"{self.run_dir.name}: could not write the {reason} checkpoint at step {loop.step} ({exc}); "
                f"the previous one is kept")
        self.saved_clock = checkpoint_clock()  # a failed write too: the next try waits a whole interval


def checkpoint_clock() -> float:
    """The clock a time cadence is measured with: wall time, in seconds (a function, so tests can move it)."""
    return time.monotonic()


def config_record(cfg: RunConfig, device: torch.device, n_params: int, n_train_tokens: int, world_size: int = 1,
                  *, precision: str, data_source: str, text_sha256: dict[str, str] | None = None,
                  attention: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json: the settings, and what the run really trained with (device, precision, attention kernel, world
    size, data).

    `precision` is the autocast precision the run used (bf16 or fp32); `text_sha256` the sha256 of each split's
    text, which identifies the data wherever it was read from (`compare` separates runs by it); `extra` the task's
    own entries.
    """
    return {
        **cfg.to_dict(),
        "data_source": data_source,
        "checkpoint_cadence": cfg.checkpoint_cadence.to_dict(),  # checkpoint_every parsed
        "resolved_device": str(device),
        "resolved_precision": precision,
        "resolved_attention": attention,
        "world_size": world_size,
        "n_params": n_params,
        "train_tokens": n_train_tokens,
        **({"text_sha256": text_sha256} if text_sha256 is not None else {}),
        "versions": {"hlb_gpt": hlb_gpt.__version__, "torch": torch.__version__, "python": platform.python_version()},
        **(extra or {}),
    }


def train(cfg: RunConfig, run_dir: Path | str, progress: bool = True, resume: bool = False,
          lock: RunLock | None = None) -> dict[str, Any]:
    """Train one run of `cfg.task` into `run_dir` and return its summary (also written to summary.json).

    The run lasts the task's planned steps, or ends early at an evaluation the task says to stop at. It evaluates
    --evals-per-epoch times an epoch and at the end, and checkpoints every --checkpoint-every epochs, or at the
    first sync point after that much time (`30m`), and at the end (never when it is 0). With `resume`, it
    continues from the run's latest checkpoint if it has one. A run that fails or is interrupted (SIGINT,
    SIGTERM: after a checkpoint) still gets a summary with that status before the exception propagates. Under
    torchrun only rank 0 evaluates and writes; every rank returns the summary. `lock` is the run's lock, if this
    process holds one: once another process has taken it over, the run stops before its next write (LockLost),
    leaving the run's records to that process.
    """
    run_dir = Path(run_dir)
    fresh_start()  # no compiled graph or recompile count of an earlier run in this process
    graphs_at_start = graphs_compiled()
    ddp = distributed.from_env()
    device = distributed.init(ddp, resolve_device(cfg.device))
    peak = PeakMemory.start(device)
    say = (tqdm.write if progress else logger.info) if ddp.is_main else (lambda msg: None)
    compile_model = compiles(cfg, device)
    task = task_type(cfg)(cfg, device, ddp, compile_model)
    autocast = autocast_for(device, task.precision)
    n_train = task.n_train

    torch.manual_seed(cfg.seed)
    model = task.build_model()
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]
    optimizer, scheduler = task.build_optimizer(named_params)
    on_evaluation = components.optimizer_of(vars(cfg)).on_evaluation
    grad_filter = build_filter(cfg, named_params, compile=compile_model)
    parts = Resumable(cfg, run_dir, model, optimizer, scheduler, grad_filter, task)
    loop, metrics, checkpoint = parts.start(resume)
    task.begin(model, run_dir, resumed=checkpoint is not None)
    loop.to(device)

    net, no_sync = model, contextlib.nullcontext
    if ddp.enabled:
        wrapped = distributed.wrap(model, device)
        net, no_sync = wrapped, wrapped.no_sync
    if compile_model:
        net = FallbackCompiled(net, "the model", dynamic_dims=task.dynamic_dims, static_sizes=task.static_sizes,
                               rebuild=getattr(model, "compile_fallback", None))
    forward = functools.partial(task.loss, net)
    eval_net = net
    if ddp.enabled:  # rank 0 evaluates alone: not through DDP's collective forward, but compiled all the same
        eval_net = (FallbackCompiled(model, "the evaluation model", dynamic_dims=task.dynamic_dims,
                                     static_sizes=task.static_sizes, rebuild=getattr(model, "compile_fallback", None))
                    if compile_model else model)

    total_steps = task.planned_steps(cfg, n_train)
    # A run resumed after an evaluation that reached its target (--target-acc, --target-loss) trains no further:
    # it stopped there, and an extension (more --epochs or --max-steps) would only run on to the next evaluation.
    reached = next(filter(None, map(task.should_stop, metrics)), None) if ddp.is_main else None
    if distributed.broadcast_flag(reached is not None, ddp, device):
        total_steps = loop.step
        say(f"{run_dir.name}: reached its target earlier ({reached}): not trained past step {loop.step:,}")
    tokens_per_eval = n_train / cfg.evals_per_epoch
    tokens_per_checkpoint = cfg.checkpoint_cadence.epochs * n_train or math.inf

    n_params = sum(p.numel() for p in model.parameters())
    writer = RunWriter(run_dir, lock.check if lock is not None else None) if ddp.is_main else None
    if writer:
        writer.begin(config_record(cfg, device, n_params, n_train, ddp.world_size, precision=task.precision,
                                   data_source=task.data_source, text_sha256=task.text_sha256,
                                   attention=task.attention, extra=task.record()), metrics)
    tracker = make_tracker(cfg, run_dir, resumed=checkpoint is not None) if ddp.is_main else NoTracker()
    device_peak = peak_flops(device)  # MFU's denominator: every rank's device together
    flops_peak = device_peak * ddp.world_size if device_peak else None
    say(f"{run_dir.name}: {n_params:,} parameters on {device}{f' x {ddp.world_size} ranks' if ddp.enabled else ''}, "
        f"{task.describe(total_steps)}{f', resumed at step {loop.step:,}' if checkpoint is not None else ''}")
    window, no_window = profile_window(cfg.profile, loop.step, total_steps)
    if no_window:
        say(f"{run_dir.name}: {no_window}")
    profiler = StepProfiler(window, run_dir, device, trace=ddp.is_main)

    memory: dict[str, Any] = {}
    outcome = RunStatus(run_dir.name, say)
    last_val, last_columns = loop.final, {}
    end_columns: dict[str, Any] = {}
    bar = tqdm(total=total_steps, initial=min(loop.step, total_steps), unit="step", bar_format=BAR_FORMAT,
               disable=not (progress and ddp.is_main), dynamic_ncols=True, leave=True)
    rate, rate_mark = throughput(0, 0.0, 0.0, flops_peak), loop.steady_marks()

    def save(reason: str) -> None:
        if writer is not None:  # rank 0 alone writes
            writer.check()
            parts.save(loop, metrics, reason, say)

    def log_point(train_loss: float, result: StepResult | None) -> bool:
        """Evaluate and write a metrics row; True when the task says the run ends here (on every rank). Without a
        step's `result` (the evaluation before training) the training columns are null: nothing has trained."""
        nonlocal last_val, last_columns
        evaluating = Lap.begin(loop)
        columns = task.evaluate(eval_net, autocast) if ddp.is_main else {"val_loss": math.nan}
        loop.add_evaluation(evaluating)
        val = last_val = columns.pop("val_loss")
        last_columns = columns
        ratio = math.nan if result is None or result.ema_ratio is None else result.ema_ratio.item()
        grad_norm = math.nan if result is None else result.grad_norm.item()
        row = {**loop.metrics_row(n_train, train_loss, val, scheduler.get_last_lr()[0], grad_norm, ratio), **columns}
        if result is None:
            row.update({k: None for k in row if k.startswith("train_") or k == "grad_norm"})
        metrics.append(row)
        if writer:
            writer.append_metrics(row)
        tracker.log(row)
        if on_evaluation is not None and result is not None:  # GrokAdamW reads the gap between val and train loss
            on_evaluation(optimizer, train_loss, distributed.gather_floats(val, ddp, device)[0])
        if distributed.broadcast_flag(not math.isfinite(val), ddp, device):  # rank 0 decides for all ranks
            raise Diverged(f"validation loss is not finite at step {loop.step}")
        reason = task.should_stop(row) if ddp.is_main else None
        if not distributed.broadcast_flag(reason is not None, ddp, device):
            return False
        say(f"{run_dir.name}: {reason} at step {loop.step}")
        return True

    wall_start = time.perf_counter() - loop.wall_time
    try:
        with outcome, StopSignals() as stop:
            if cfg.eval_at_start and loop.step == 0 and not metrics:  # not when a run continues
                log_point(math.nan, None)
            profiler.at(loop.step)
            lap = Lap.begin(loop)
            while loop.step < total_steps:
                if lock is not None:
                    lock.check(look=False)  # what the heartbeat found: a lost lock stops the run at once
                profiler.begin_step(loop.step + 1)
                batch = task.batch(loop.step)
                x, y = batch.x.chunk(ddp.world_size)[ddp.rank], batch.y.chunk(ddp.world_size)[ddp.rank]
                micro = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
                before = loop.tokens
                loop.tokens += batch.items
                loop.flops += batch.flops
                loop.step += 1
                evaluate_now = eval_due(before, loop.tokens, tokens_per_eval) or loop.step == total_steps
                checkpoint_now = eval_due(before, loop.tokens, tokens_per_checkpoint)
                result = optimizer_step(forward, micro, params, optimizer, scheduler, grad_filter, cfg.clip,
                                        autocast, measure=evaluate_now, no_sync=no_sync)
                loop.loss_sum += result.loss * batch.weight
                loop.loss_count += batch.weight
                loop.bad_run = (loop.bad_run + result.found_inf) * result.found_inf
                loop.diverged_at = torch.where((loop.diverged_at < 0) & (loop.bad_run > cfg.max_bad_steps),
                                               loop.step, loop.diverged_at)
                bar.update(1)

                stopping = stop.requested is not None
                if ddp.enabled:  # every rank must stop at the same step; agree at refresh points only
                    stopping = loop.step % REFRESH_STEPS == 0 and distributed.broadcast_flag(stopping, ddp, device)
                if evaluate_now or checkpoint_now or stopping or loop.step % REFRESH_STEPS == 0 or loop.step == 1:
                    synchronize(device)
                    loop.add_lap(lap, profiled=profiler.tracing)
                    if change := nonfinite_fallback(model, result.found_inf, batch.x.shape[-1], loop.step):
                        say(f"{run_dir.name}: non-finite gradients at step {loop.step}: {change} from now on")
                        loop.bad_run.zero_()  # the steps the fallback answers do not count towards divergence
                        loop.diverged_at.fill_(-1)
                    if loop.diverged_at.item() >= 0:
                        raise Diverged(f"more than {cfg.max_bad_steps} consecutive steps with non-finite "
                                       f"gradients, from step {int(loop.diverged_at.item()) - cfg.max_bad_steps}")
                    train_loss = distributed.mean(loop.loss_sum / max(loop.loss_count, 1), ddp).item()
                    if not memory:
                        memory = memory_breakdown(model, optimizer, grad_filter, peak)
                        say(format_memory(memory))
                    finished = False
                    if evaluate_now:
                        loop.loss_sum.zero_()
                        loop.loss_count = 0
                        finished = log_point(train_loss, result)
                    loop.wall_time = time.perf_counter() - wall_start
                    if finished:
                        break
                    if (checkpoint_now and parts.gap_passed()) or stopping or parts.time_due():
                        save("signal" if stopping else "periodic")
                    if stopping:
                        raise Interrupted(f"stopped by {stop.requested or 'rank 0'} at step {loop.step}")
                    if loop.steady_steps > rate_mark[0]:  # the rate since the last refresh, if a step of it was steady
                        now = loop.steady_marks()
                        rate = throughput(*(a - b for a, b in zip(now[1:], rate_mark[1:])), flops_peak)
                        rate_mark = now
                    bar.set_postfix_str(_postfix(loop.tokens / n_train, train_loss, last_val, last_columns, rate),
                                        refresh=False)
                    lap = Lap.begin(loop)
                if profiler.boundary(loop.step):  # a sync of its own: the traced steps' time is kept apart
                    synchronize(device)
                    loop.add_lap(lap, profiled=profiler.tracing)
                    profiler.at(loop.step)
                    lap = Lap.begin(loop)
            save("final")  # so that a completed run can be extended with more --epochs or --max-steps
            if ddp.is_main:  # after the checkpoint: a failure here costs no training
                end_columns = task.evaluate_end(eval_net, autocast)
    finally:
        profiler.close()
        bar.close()
        memory = final_memory(memory, model, optimizer, grad_filter, peak)
        summary = {
            **run_summary(outcome.status, outcome.error, loop, n_train, time.perf_counter() - wall_start, memory,
                          compile_record(compile_model, [net.error if compile_model else None,
                                                         grad_filter.compile_error, getattr(eval_net, "error", None)],
                                         graphs_at_start), flops_peak),
            "attention_fallback": getattr(model, "attention_fallback", None),
            **task.summary(metrics),
            **end_columns,
        }
        if ddp.enabled and outcome.status != "failed":
            summary["ddp"] = {"world_size": ddp.world_size,
                              "filter_checksums": distributed.gather_floats(filter_checksum(grad_filter), ddp, device)}
        unwritten = None
        if writer:
            try:
                writer.write_summary(summary)
            except RecordWriteError as exc:  # a full disk: say so; a run that ends without its summary failed
                unwritten = exc
                if outcome.status in ("failed", "interrupted"):  # its own error follows: this line only adds to it
                    say(f"{run_dir.name}: {exc}; the run has no summary.json")
        tracker.finish(summary)
        if unwritten is not None and outcome.status not in ("failed", "interrupted"):
            raise unwritten
    return summary


def run_summary(status: str, error: str | None, loop: LoopState, n_train: int, wall_time: float,
                memory: dict[str, Any], compiled: dict[str, Any], peak: float | None = None) -> dict[str, Any]:
    """The keys every summary.json has, whatever the task. `step_time_s` is the steady time per step (None if
    every interval compiled something), and tokens/s, FLOP/s and MFU (over `peak`, the FLOP/s of the run's
    devices; None without one) are steady too; `compiled` is `compile_record`'s."""
    return {
        "status": status,
        "error": error,
        "best_val_loss": loop.best,
        "final_val_loss": loop.final,
        "steps": loop.step,
        "tokens": loop.tokens,
        "epochs": loop.tokens / n_train,
        "train_time_s": loop.train_time,
        "wall_time_s": wall_time,
        "step_time_s": loop.steady_time / loop.steady_steps if loop.steady_steps else None,
        "steady_steps": loop.steady_steps,
        "compile_time_s": loop.compile_time,
        **throughput(loop.steady_tokens, loop.steady_flops, loop.steady_time, peak),
        **compiled,
        "memory": memory,
    }


# Elements per slice of the checksum's float64 sums: 32 MiB of temporaries whatever the state's size.
CHECKSUM_SLICE = 2**22


def filter_checksum(grad_filter: GradFilter) -> float:
    """A number that differs when filter states differ: all-reduce makes it equal on every rank.

    Summed in float64 a slice at a time (a float64 copy of the MA ring would double the largest state at the end
    of the run), on the device, and read back once."""
    sums = []
    for st in grad_filter.state_dict().get("state", {}).values():
        for value in st.values():
            if isinstance(value, Tensor) and value.is_floating_point():
                for part in value.detach().reshape(-1).split(CHECKSUM_SLICE):
                    sums.append(part.abs().sum(dtype=torch.float64) + part.sum(dtype=torch.float64))
    return torch.stack(sums).sum().item() if sums else 0.0


def _postfix(epoch: float, train_loss: float, val_loss: float, columns: dict[str, float],
             rate: dict[str, float | None]) -> str:
    """The progress bar's text after its counts: `rate` is `flops.throughput`'s since the last refresh."""
    val = "val -" if math.isnan(val_loss) else f"val {val_loss:.3f}"
    extra = "".join(f" | {name.replace('_', ' ')} {value:.3f}" for name, value in columns.items())
    speed = "tokens/s -" if rate["tokens_per_s"] is None else f"{rate['tokens_per_s']:,.0f} tokens/s"
    mfu = "" if rate["mfu"] is None else f" | MFU {100 * rate['mfu']:.1f}%"
    return f"epoch {epoch:.3f} | loss {train_loss:.3f} | {val}{extra} | {speed}{mfu}"
