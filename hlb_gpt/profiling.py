"""--profile N: a `torch.profiler` Chrome trace of the training steps N to N + 2, written to the run folder's
`profile.json` (open it in chrome://tracing or https://ui.perfetto.dev), so a slow step can be looked at without
editing code.

Bookkeeping, not part of the experiment: the trace changes nothing the run computes. The trainer brackets the
steps with host syncs of their own and counts their time as training time but not as steady time, so the
profiler's overhead stays out of the run's tokens/s and step time. Under torchrun rank 0 alone traces.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from hlb_gpt.durable import temporary_name, write_durably

PROFILE = "profile.json"
PROFILE_STEPS = 3  # enough to see a steady step between its neighbours; each one adds to the trace's size

logger = logging.getLogger(__name__)


def profile_window(first: int | None, start_step: int, total_steps: int) -> tuple[tuple[int, int] | None, str | None]:
    """((first, last) steps to trace, None), or (None, why not) when --profile `first` falls outside the steps a
    run starting at `start_step` takes (up to `total_steps`); (None, None) without --profile. Steps count from 1,
    as metrics.jsonl counts them."""
    if first is None:
        return None, None
    if first > total_steps:
        return None, f"--profile {first} is past the run's last step ({total_steps}): no {PROFILE}"
    if first <= start_step:
        return None, f"--profile {first}: the run continues from step {start_step}, after it: no {PROFILE}"
    return (first, min(first + PROFILE_STEPS - 1, total_steps)), None


class StepProfiler:
    """Traces the steps of `window` (first, last) into `run_dir`/profile.json, if `trace` (rank 0). Without a
    window (no --profile, or nothing to trace) every method does nothing, so the loop needs no `if`."""

    def __init__(self, window: tuple[int, int] | None, run_dir: Path, device: torch.device, trace: bool) -> None:
        self.window, self.run_dir, self.device, self.trace = window, Path(run_dir), device, trace
        self._profiler: torch.profiler.profile | None = None
        self._mark: torch.profiler.record_function | None = None

    @property
    def tracing(self) -> bool:
        return self._profiler is not None

    def boundary(self, step: int) -> bool:
        """Whether the loop syncs after `step` for the trace: before its first step and after its last."""
        return self.window is not None and step in (self.window[0] - 1, self.window[1])

    def at(self, step: int) -> None:
        """Start tracing when the next step is the window's first; stop and write the trace after its last. Call
        it right after a sync, when `step` steps are done."""
        if self.window is None:
            return
        if step == self.window[0] - 1 and self.trace and not self.tracing:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            try:
                profiler.start()
            except Exception as exc:  # a trace is bookkeeping: the run goes on without it
                logger.warning("%s: could not start the profiler (%s): no %s", self.run_dir.name, exc, PROFILE)
                return
            self._profiler = profiler
        elif step == self.window[1]:
            self.close()

    def begin_step(self, step: int) -> None:
        """Mark training step `step` beginning: the trace's `step N` range holds all it does, its evaluation and
        checkpoint too, up to the next. Nothing when not tracing."""
        if self._profiler is None:
            return
        self._end_mark()
        self._mark = torch.profiler.record_function(f"step {step}")
        self._mark.__enter__()

    def _end_mark(self) -> None:
        mark, self._mark = self._mark, None
        if mark is not None:
            mark.__exit__(None, None, None)

    def close(self) -> None:
        """Stop tracing and write what was traced (a run that ended inside the window: the steps it took). A trace
        that cannot be written is reported, and the run is not failed for it: it still writes its summary."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        path = self.run_dir / PROFILE
        exported = temporary_name(path)  # the profiler writes by name; the trace appears whole, durably
        try:
            self._end_mark()
            profiler.stop()
            profiler.export_chrome_trace(str(exported))
            with open(exported, "rb") as src:
                write_durably(path, lambda f: shutil.copyfileobj(src, f))
        except Exception as exc:  # OSError (a full disk), or the profiler's own
            logger.warning("%s: could not write %s (%s)", self.run_dir.name, path, exc)
        finally:
            exported.unlink(missing_ok=True)
