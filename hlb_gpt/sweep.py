"""Grids of runs: expand lists of settings into configs, name their folders, run them in order.

A single run is a sweep of one, so the layout is always `<out>/<run name>/`. Seeds are shared by every
configuration (a paired design), and a run that already completed in `<out>` is skipped.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hlb_gpt.config import ConfigError, RunConfig, check_resumable
from hlb_gpt.data import DataUnavailable
from hlb_gpt.records import Run, RunWriter, is_run_dir, read_run

logger = logging.getLogger(__name__)

MODEL_KEYS = ("depth", "width", "gate")
FILTER_KEYS = ("filter", "alpha", "gain", "window")


def expand_grid(base: RunConfig, grid: dict[str, Sequence[Any]], grokfast: bool, baseline: bool) -> list[RunConfig]:
    """Every grid point as a config, seeds outermost so an unfinished sweep still holds complete paired sets.

    `grid` maps field names to lists of values (missing keys keep the base value). A filtered run is one with
    `grokfast` (EMA points: alpha × gain; MA points: window × gain) or with GrokAdamW (alpha × gain);
    `baseline` adds the unfiltered AdamW run for every seed. With neither filter, only that run exists.
    """
    values = lambda key: list(grid.get(key) or [getattr(base, key)])  # noqa: E731
    filtered = grokfast or base.optimizer == "grokadamw"
    points: list[dict[str, Any]] = []
    for kind in values("filter") if filtered else []:
        varying = ("window", "gain") if kind == "ma" and base.optimizer != "grokadamw" else ("alpha", "gain")
        for combo in itertools.product(*(values(k) for k in varying)):
            point = {"filter": kind, **dict(zip(varying, combo))}
            if point not in points:
                points.append(point)
    configs = []
    for seed in values("seed"):
        for model_point in itertools.product(*(values(k) for k in MODEL_KEYS)):
            model = dict(zip(MODEL_KEYS, model_point))
            if baseline or not filtered:
                configs.append(base.replace(seed=seed, grokfast=False, optimizer="adamw", **model))
            configs += [base.replace(seed=seed, **model, **point) for point in points]
    return configs


def run_name(cfg: RunConfig, vary: Sequence[str] = ()) -> str:
    """A folder name that says what the run is: `baseline-s0`, `ema-a0.9-g0.1-s0`, `ma-w100-g5-d4-s1`."""
    if cfg.optimizer == "grokadamw":
        parts = [f"grokadamw-a{cfg.alpha:g}-g{cfg.gain:g}"]
    elif not cfg.grokfast:
        parts = ["baseline"]
    elif cfg.filter == "ema":
        parts = [f"ema-a{cfg.alpha:g}-g{cfg.gain:g}"]
    else:
        parts = [f"ma-w{cfg.window}-g{cfg.gain:g}"]
    short = {"depth": "d", "width": "w", "gate": "gate-"}
    parts += [f"{short[k]}{getattr(cfg, k)}" for k in MODEL_KEYS if k in vary]
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)


@dataclass
class SweepResult:
    name: str
    status: str
    summary: dict[str, Any] | None


def run_sweep(configs: list[RunConfig], out: Path, vary: Sequence[str] = (),
              train_fn: Callable[..., dict[str, Any]] | None = None, progress: bool = True) -> list[SweepResult]:
    """Run every config into `out/<run name>/`: completed runs are skipped, unfinished ones (and completed ones
    asked for more epochs) continue from their latest checkpoint, and a failed run does not stop the rest."""
    out = Path(out)
    for cfg in configs:  # before any work: a run folder may only be continued with its own settings
        run_dir = out / run_name(cfg, vary)
        if is_run_dir(run_dir):
            check_resumable(cfg, read_run(run_dir).config, run_dir)
    results = []
    for i, cfg in enumerate(configs, 1):
        name = run_name(cfg, vary)
        run_dir = out / name
        if is_run_dir(run_dir) and is_done(cfg, read_run(run_dir)):
            logger.info("[%d/%d] %s: completed already, skipped", i, len(configs), name)
            results.append(SweepResult(name, "completed", read_run(run_dir).summary))
            continue
        logger.info("[%d/%d] %s", i, len(configs), name)
        try:
            summary = (train_fn or trainer_for(cfg))(cfg, run_dir, progress=progress, resume=True)
        except (KeyboardInterrupt, DataUnavailable, ConfigError):
            raise  # the user stopped, or no run can get its data: stop the sweep
        except Exception as exc:  # one broken configuration must not cost the others
            logger.error("%s failed: %s: %s", name, type(exc).__name__, exc)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # ...except under torchrun: the other ranks wait for this one in a collective. Rank 0 records
                # the failure; the exception ends this process, and torchrun stops the others.
                if os.environ.get("RANK", "0") == "0":
                    _record_failure(cfg, run_dir, exc)
                raise
            summary = _record_failure(cfg, run_dir, exc)
        results.append(SweepResult(name, summary["status"], summary))
    return results


def is_done(cfg: RunConfig, run: Run) -> bool:
    """Completed with this length; a completed run asked for more epochs or steps continues instead."""
    return run.status == "completed" and all(run.config.get(k) == getattr(cfg, k) for k in ("epochs", "max_steps"))


def trainer_for(cfg: RunConfig) -> Callable[..., dict[str, Any]]:
    """The training function of the config's task (imported here: it brings in torch)."""
    if cfg.task == "modular":
        from hlb_gpt.tasks.modular import train_modular

        return train_modular
    from hlb_gpt.train import train

    return train


def _record_failure(cfg: RunConfig, run_dir: Path, exc: Exception) -> dict[str, Any]:
    """A run that failed before training wrote its own records still leaves a folder saying why."""
    writer = RunWriter(run_dir)
    if not is_run_dir(run_dir):
        writer.write_config(cfg.to_dict())
    run = read_run(run_dir)
    if run.summary is not None:
        return run.summary
    summary = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    writer.write_summary(summary)
    return summary
