"""Grids of runs: expand lists of settings into configs, name their folders, run them in order.

A single run is a sweep of one, so the layout is always `<out>/<run name>/`. Seeds are shared by every
configuration (a paired design), and a run that already completed in `<out>` is skipped. Several processes
may run the same sweep: each run is trained by the one that holds its lock (see `locks`), and all of them with
the settings the sweep's manifest records (`sweep_settings`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hlb_gpt import components, distributed
from hlb_gpt.checkpoint import list_checkpoints
from hlb_gpt.config import GRID_KEYS, MAY_CHANGE_ON_RESUME, ConfigError, RunConfig, check_resumable
from hlb_gpt.data import DataUnavailable
from hlb_gpt.device import resolve_device
from hlb_gpt.locks import DEFAULT_TIMEOUT_S, LockLost, RunLock, read_lock, try_claim
from hlb_gpt.records import CorruptRecord, Run, RunWriter, is_run_dir, read_run
from hlb_gpt.status import write_manifest

logger = logging.getLogger(__name__)

# How the runs of one sweep folder may differ: by what their folder names name (the seed, their arm: --grokfast,
# --baseline, the optimizer and filter with what they show; and the settings the grid varies), and in what a
# resumed run may change (its length, the bookkeeping, the device). Every other setting belongs to the sweep, and
# all its workers must agree on it: two runs that differ in a setting their folder does not name would share it.
PER_RUN = frozenset({"seed", "grokfast"}) | MAY_CHANGE_ON_RESUME
# A varying setting's part of a run's folder name: `lr0.003`, `d4`; others by their name (`batch_size8`).
SHORT_NAMES = {"depth": "d", "width": "w", "gate": "gate-", "lora_rank": "r", "lr": "lr", "weight_decay": "wd",
               "warmup_steps": "warmup", "batch_size": "b", "seq_len": "seq", "muon_lr": "mlr",
               "muon_momentum": "mmom", "grok_kappa": "kappa", "grok_gamma": "gamma", "filter_dtype": "fd-",
               "lora_alpha": "la", "dataset": "", "tokenizer": "tok-", "train_tokens_limit": "train"}


def expand_grid(base: RunConfig, grid: dict[str, Sequence[Any]], grokfast: bool, baseline: bool) -> list[RunConfig]:
    """Every grid point as a config, seeds outermost so an unfinished sweep still holds complete paired sets.

    `grid` maps field names to lists of values (missing keys keep the base value); every list is crossed with the
    others. At each point, a filtered run is one with `grokfast` (its filter's points: the product of the settings
    it shows, e.g. alpha × gain for EMA) or with an optimizer that filters (GrokAdamW: alpha × gain); `baseline`
    adds the point's plain counterpart (`components`: Muon's for a Muon point, at the point's lr...). With
    neither filter, only that run exists. A setting one optimizer alone owns (Muon's) is dropped from the points
    of the others, and a point met twice is kept once.
    """
    values = lambda key: list(grid.get(key) or [getattr(base, key)])  # noqa: E731
    crossed = [key for key in GRID_KEYS if key != "seed" and key not in components.arm_settings() - {"optimizer"}]
    configs: list[RunConfig] = []
    for seed in values("seed"):
        for combo in itertools.product(*(values(k) for k in crossed)):
            changes = dict(zip(crossed, combo))
            owned = components.optimizer_of(changes).defaults
            point = base.replace(seed=seed, **{k: v for k, v in changes.items()
                                               if k in owned or k not in components.owned_settings()})
            arms = [point.replace(**components.plain_counterpart(vars(point)))] if baseline or not (
                grokfast or components.optimizer_of(vars(point)).filters) else []
            arms += [point.replace(**changes) for changes in _filter_points(point, values, grokfast)]
            configs += [cfg for cfg in arms if cfg not in configs]
    return configs


def _filter_points(point: RunConfig, values: Callable[[str], list[Any]], grokfast: bool) -> list[dict[str, Any]]:
    """The filtered runs at one grid point: each filter of the grid crossed with the settings it shows."""
    optimizer = components.optimizer_of(vars(point))
    points: list[dict[str, Any]] = []
    for name in values("filter") if grokfast or optimizer.filters else []:
        shown = [key for key, _, _ in (optimizer if optimizer.filters else components.FILTERS[name]).shown]
        for combo in itertools.product(*(values(k) for k in shown)):
            changes = {"filter": name, **dict(zip(shown, combo))}
            if changes not in points:
                points.append(changes)
    return points


def varying(grid: dict[str, Sequence[Any]]) -> list[str]:
    """The settings the run folders of a sweep over `grid` must name besides what the components name: those
    with more than one value, but the seed."""
    arm = components.arm_settings()
    return [key for key in GRID_KEYS if key != "seed" and key not in arm and len(set(grid.get(key) or [])) > 1]


def run_folder_name(cfg: RunConfig, vary: Sequence[str] = ()) -> str:
    """The run's folder in the sweep, named for what the run is: `baseline-s0`, `ema-a0.9-g0.1-s0`,
    `ma-w100-g5-d4-s1`, `grokadamw-a0.98-g2-s0`, `muon-ema-a0.9-g0.1-lr0.003-s0` (`vary`: the other settings the
    grid varies, `varying`; one a run does not have, as Muon's lr in an AdamW run, is left out)."""
    parts = [components.folder_part(vars(cfg))]  # `muon-s0`, `muon-ema-a0.9-g0.1-s0`
    for key in GRID_KEYS:
        value = getattr(cfg, key)
        if key in vary and value is not None:
            parts.append(f"{SHORT_NAMES.get(key, key)}{value:g}" if isinstance(value, float)
                         else f"{SHORT_NAMES.get(key, key)}{value}")
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)


def sweep_settings(configs: Sequence[RunConfig], vary: Sequence[str] = ()) -> dict[str, Any]:
    """The settings every run of `configs` shares and no folder name says (`vary`: the settings the grid varies,
    which the names do say): those its manifest records, and any other worker of the sweep must share."""
    if not configs:
        return {}
    first = configs[0].to_dict()
    own, named = components.owned_settings(), PER_RUN | components.arm_settings() | set(vary)
    return {key: value for key, value in first.items()
            if key not in named and not (key in own and value is None)
            and all(getattr(cfg, key) == value for cfg in configs)}


@dataclass
class SweepResult:
    name: str
    status: str  # the summary's status, or "running" while another process trains the run
    summary: dict[str, Any] | None
    holder: str | None = None  # host:pid of that process


@dataclass(frozen=True)
class Decision:
    """Rank 0's verdict on one run, sent to every rank: train it here, skip it as done, or leave it to `holder`."""

    action: str  # train, done or busy
    summary: dict[str, Any] | None = None
    holder: str | None = None


def run_sweep(configs: list[RunConfig], out: Path, vary: Sequence[str] = (),
              train_fn: Callable[..., dict[str, Any]] | None = None, progress: bool = True,
              lock_timeout_s: float = DEFAULT_TIMEOUT_S) -> list[SweepResult]:
    """Run every config into `out/<run folder name>/`: completed runs are skipped, unfinished ones (and completed ones
    asked for more epochs) continue from their latest checkpoint, and a failed run does not stop the rest.

    Processes running the same sweep split it: a process trains only the runs whose lock it claims, and leaves
    those held by live processes (their results say "running"). A run whose process died (on another host: whose
    heartbeat is older than `lock_timeout_s`) is taken over and continues from its checkpoint; a process whose run
    was taken over stops writing to it and goes on with the next. Before any work, a command whose settings differ
    from those the sweep's manifest records is refused (ConfigError). Under torchrun, rank 0 decides for all
    ranks."""
    out, started = Path(out), time.time()
    ddp = _join_process_group(configs)
    names = [run_folder_name(cfg, vary) for cfg in configs]

    def prepare() -> dict[str, str]:
        unreadable = check_folders(configs, out, vary)
        write_manifest(out, names, sweep_settings(configs, vary))
        return unreadable

    unreadable = distributed.on_rank0(prepare, ddp)
    bar = tqdm(total=len(configs), unit="run", desc="sweep", position=0, dynamic_ncols=True,
               disable=not (progress and ddp.is_main and len(configs) > 1))
    results: dict[int, SweepResult] = {}
    todo = list(range(len(configs)))
    with bar, logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext():
        for second_look in (False, True):  # a second look at runs held elsewhere: their process may have died
            for i in todo:
                label = f"[{i + 1}/{len(configs)}] {names[i]}"
                if names[i] in unreadable:  # damaged records: this run fails alone
                    error = unreadable[names[i]]
                    logger.error("%s failed: %s", label, error)
                    results[i] = SweepResult(names[i], "failed", {"status": "failed", "error": error})
                    bar.update(1)
                    continue
                results[i] = sweep_one(configs[i], out / names[i], label, train_fn, progress,
                                       lock_timeout_s, ddp, report_busy=not second_look, since=started)
                if results[i].status != "running":
                    bar.update(1)
            todo = [i for i in todo if results[i].status == "running"]
            if todo:
                bar.set_postfix_str(f"{len(todo)} running elsewhere")
    if todo:
        logger.info("still running in other processes: %s",
                    ", ".join(f"{results[i].name} ({results[i].holder})" for i in todo))
    return [results[i] for i in range(len(configs))]


def check_folders(configs: list[RunConfig], out: Path, vary: Sequence[str]) -> dict[str, str]:
    """Before any work: a run folder may only be continued with its own settings and up to its length. Returns the
    runs whose records cannot be read, with why: those fail alone."""
    unreadable: dict[str, str] = {}
    for cfg in configs:
        run_dir = out / run_folder_name(cfg, vary)
        if is_run_dir(run_dir):
            try:
                check_run(cfg, run_dir)
            except CorruptRecord as exc:
                unreadable[run_dir.name] = str(exc)
    return unreadable


def sweep_one(cfg: RunConfig, run_dir: Path, label: str, train_fn: Callable[..., dict[str, Any]] | None,
              progress: bool, lock_timeout_s: float, ddp: distributed.Dist, report_busy: bool = True,
              since: float | None = None) -> SweepResult:
    """One run of the sweep: skip it, leave it to its holder, or claim it and train it (every rank, under torchrun),
    releasing the lock however the run ends."""
    lock: RunLock | None = None

    def decide() -> Decision:
        nonlocal lock
        decision, lock = claim(cfg, run_dir, lock_timeout_s, since)
        return decision

    try:
        decision = distributed.on_rank0(decide, ddp)
    except OSError as exc:  # a full disk: the run cannot even be claimed, so it fails alone and the sweep goes on
        logger.error("%s failed: cannot claim it: %s", label, exc)
        return SweepResult(run_dir.name, "failed", {"status": "failed", "error": f"cannot claim the run: {exc}"})
    if decision.action == "done":
        status = decision.summary.get("status", "completed")
        logger.info("%s: %s already, skipped", label, status)
        return SweepResult(run_dir.name, status, decision.summary)
    if decision.action == "busy":
        if report_busy:
            logger.info("%s: running on %s, skipped", label, decision.holder)
        return SweepResult(run_dir.name, "running", None, decision.holder)
    logger.info(label)
    guard = lock.check if lock is not None else None
    try:
        if train_fn is None:
            from hlb_gpt.train import train  # imported here: it brings in every task's model

            train_fn = functools.partial(train, lock=lock)  # it stops before any write once the lock is lost
        summary = train_fn(cfg, run_dir, progress=progress, resume=True)
    except (KeyboardInterrupt, DataUnavailable, ConfigError):
        raise  # the user stopped, or no run can get its data: stop the sweep
    except LockLost as exc:  # another process took the run for abandoned: it is that process's run now
        logger.warning("%s: taken over by %s, to which this process's lock looked stale; this process stopped "
                       "writing to the run", label, exc.holder)
        if ddp.enabled:  # the other ranks wait in a collective: end this process, and torchrun stops them
            raise
        return SweepResult(run_dir.name, "running", None, str(exc.holder))
    except Exception as exc:  # one broken configuration must not cost the others
        logger.error("%s failed: %s: %s", run_dir.name, type(exc).__name__, exc)
        if ddp.enabled:
            # ...except under torchrun: the other ranks wait for this one in a collective. Rank 0 records
            # the failure; the exception ends this process, and torchrun stops the others.
            if ddp.is_main:
                _record_failure(cfg, run_dir, exc, guard)
            raise
        summary = _record_failure(cfg, run_dir, exc, guard)
    finally:
        if lock is not None:
            lock.release()
    return SweepResult(run_dir.name, summary["status"], summary)


def claim(cfg: RunConfig, run_dir: Path, lock_timeout_s: float,
          since: float | None = None) -> tuple[Decision, RunLock | None]:
    """Read from disk: a completed run is done, and so is one another process of the sweep finished (diverged or
    failed) after `since`, so that workers do not each retry it; a run locked by a live process is busy; any other
    is claimed. Its records, which other processes may have written since the sweep began, must be those of `cfg`
    (its settings, and no further than its length: `check_run`) to count as done, and again once its lock is won,
    before a takeover continues them; otherwise ConfigError, and the folder is left as it is."""
    if is_run_dir(run_dir):
        run = check_run(cfg, run_dir)
        if _finished(cfg, run, since):
            return Decision("done", run.summary), None
    lock = try_claim(run_dir, lock_timeout_s)
    if lock is None:
        held = read_lock(run_dir)
        return Decision("busy", holder=str(held.owner) if held else "another process"), None
    try:
        if is_run_dir(run_dir):  # as they are now that no other process writes them
            run = check_run(cfg, run_dir)
            if _finished(cfg, run, since):  # its holder ended it as we looked
                lock.release()
                return Decision("done", run.summary), None
    except BaseException:
        lock.release()
        raise
    return Decision("train"), lock


def check_run(cfg: RunConfig, run_dir: Path) -> Run:
    """The run's records, after checking that `cfg` may count them as its own or continue them: the same
    settings (`check_resumable`) and no further than its length (`check_length`). ConfigError if not."""
    run = read_run(run_dir)
    check_resumable(cfg, run.config, run_dir)
    check_length(cfg, run_dir)
    return run


def _finished(cfg: RunConfig, run: Run, since: float | None) -> bool:
    if is_done(cfg, run):
        return True
    ended = read_lock(run.path)
    return (since is not None and run.summary is not None and ended is not None and ended.released is not None
            and ended.released >= since)


def _join_process_group(configs: list[RunConfig]) -> distributed.Dist:
    """Under torchrun, join the process group now: the ranks agree on each run before training it."""
    ddp = distributed.from_env()
    if ddp.enabled and configs:
        distributed.init(ddp, resolve_device(configs[0].device))
    return ddp


def is_done(cfg: RunConfig, run: Run) -> bool:
    """Completed with this length and target; a completed run asked for more epochs or steps, or another target,
    continues instead (one past its new target trains no further, and its summary is rewritten for it). A summary
    always belongs to the length config.json records: a run that continues removes it before its first step."""
    return run.status == "completed" and all(run.config.get(k) == getattr(cfg, k)
                                             for k in ("epochs", "max_steps", "target_acc", "target_loss"))


def check_length(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse, before any work, a run folder whose records go past the length `cfg` asks for: continuing it would
    relabel a longer run as a shorter one. Its progress is the furthest step its summary, its metrics or its
    checkpoints reached; the length asked for is in steps, on the run's recorded number of training tokens."""
    run = read_run(run_dir)
    reached = max([*(r.get("step", 0) for r in run.metrics if isinstance(r, dict)),
                   (run.summary or {}).get("steps") or 0,
                   *(int(p.stem.rpartition("-")[2]) for p in list_checkpoints(run_dir))], default=0)
    n_train = run.config.get("train_tokens")
    if not reached or not isinstance(n_train, int):
        return  # nothing trained yet, or it never got as far as its data
    from hlb_gpt.train import planned_steps  # imported here: it brings in every task's model

    asked = planned_steps(cfg, n_train)
    if reached > asked:
        epochs = max([r.get("epoch", 0) for r in run.metrics if isinstance(r, dict)]
                     + [(run.summary or {}).get("epochs") or 0])
        flag = (f"--max-steps {cfg.max_steps}" if cfg.max_steps is not None and cfg.max_steps == asked
                else f"--epochs {cfg.epochs:g}")
        raise ConfigError(f"{run_dir} already went to step {reached:,}" + (f" (epoch {epochs:.4g})" if epochs else "")
                          + f", past the {asked:,} steps of {flag}: ask for at least its length, or use another "
                          "--out (the run folder is left as it is)")


def _record_failure(cfg: RunConfig, run_dir: Path, exc: Exception,
                    guard: Callable[[], None] | None = None) -> dict[str, Any]:
    """A run that failed before training wrote its own records still leaves a folder saying why (unless `guard`,
    the check of its lock, says another process has taken the run over)."""
    summary = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    try:
        writer = RunWriter(run_dir, guard)
        if not is_run_dir(run_dir):
            writer.write_config(cfg.to_dict())
        run = read_run(run_dir)
        if run.status == "completed" and not is_done(cfg, run):
            return summary  # an extension failed before it began: the folder still holds the shorter, completed run
        if run.summary is not None:
            return run.summary
        writer.write_summary(summary)
    except (OSError, CorruptRecord) as error:  # a full disk: the sweep goes on, the folder cannot say why
        logger.error("%s: %s; its folder has no summary saying it failed", run_dir.name, error)
    except LockLost:  # its records are another process's now
        pass
    return summary
