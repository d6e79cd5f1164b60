"""Run folders to runs, through `hlb_gpt.records` only, with a note on every run left out or cut short.

A path is a run folder or a folder searched for them; the same run reached twice counts once. Unfinished,
interrupted and failed runs with evaluations after training began are kept, with a note on the epoch they
reached; a run without one (none at all, or only the evaluation of the untrained model at step 0) is left out,
unless it diverged (docs/DESIGN.md, section 11).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hlb_gpt.records import Run, is_run_dir, read_run


def load_runs(paths: Sequence[Path | str]) -> tuple[list[Run], list[str]]:
    """The runs under `paths` (run folders, sweep folders or folders of sweeps) and notes on what was skipped."""
    notes: list[str] = []
    dirs: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            notes.append(f"{path}: no such folder, skipped")
            continue
        found = [path] if is_run_dir(path) else sorted(p.parent for p in path.rglob("config.json"))
        if not found:
            notes.append(f"{path}: no run folders (with config.json) found")
        for run_dir in found:
            if run_dir.resolve() not in seen:
                seen.add(run_dir.resolve())
                dirs.append(run_dir)
    runs = []
    for run_dir in dirs:
        try:
            run = read_run(run_dir)
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            notes.append(f"{run_label(run_dir)}: unreadable ({type(exc).__name__}: {exc}), skipped")
            continue
        if not isinstance(run.config, dict):
            notes.append(f"{run_label(run_dir)}: config.json is not an object, skipped")
            continue
        notes += run.problems  # damaged metrics lines: the rows around them are used
        keep, note = _status(run)
        if keep:
            runs.append(run)
        if note:
            notes.append(note)
    return runs, notes


def run_label(run: Run | Path) -> str:
    """How notes name a run, `<sweep>/<run>`: sweeps name runs alike (`baseline-s0`), so the sweep tells them
    apart."""
    path = run.path if isinstance(run, Run) else Path(run)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def run_rows(run: Run) -> list[dict[str, Any]]:
    """Rows with an epoch, one per step (a resumed run may repeat a step: the later row wins), by epoch."""
    by_step: dict[Any, dict[str, Any]] = {}
    for row in run.metrics:
        if isinstance(row, dict) and isinstance(row.get("epoch"), (int, float)):
            step = row.get("step")
            by_step[step if step is not None else ("epoch", row["epoch"])] = row
    return sorted(by_step.values(), key=lambda r: r["epoch"])


def after_training_began(row: dict[str, Any]) -> bool:
    """Whether an evaluation read a trained model: not the one at step 0, before the first step. That one stays in
    the curves and is left out of every statistic (rows recorded without a step count as trained)."""
    return row.get("step") != 0


def last_epoch(run: Run) -> float:
    """The furthest epoch the run reached, by its rows or its summary."""
    epochs = [r["epoch"] for r in run_rows(run)]
    if run.summary and isinstance(run.summary.get("epochs"), (int, float)):
        epochs.append(run.summary["epochs"])
    return max(epochs, default=0.0)


def _status(run: Run) -> tuple[bool, str | None]:
    """Whether to keep the run, and a note on anything but a completed run."""
    name, rows = run_label(run), sum(1 for row in run_rows(run) if after_training_began(row))
    reached = last_epoch(run)
    planned = run.config.get("epochs")
    of = f" of {planned:g}" if isinstance(planned, (int, float)) else ""
    if run.status == "completed":
        return True, None
    if run.status == "diverged":  # kept even without evaluations: leaving it out would flatter its configuration
        return True, f"{name}: diverged at epoch {reached:g}; it counts as the worst value (+inf loss) from there"
    if not rows:
        why = "no summary.json" if run.summary is None else f"{run.status}: {run.summary.get('error')}"
        what = "no evaluation after training began" if run_rows(run) else "no evaluations yet"
        return False, f"{name}: {what} ({why}), skipped"
    if run.summary is None:
        return True, (f"{name}: unfinished (no summary.json): included with its {rows} evaluations "
                      f"up to epoch {reached:g}{of}")
    return True, f"{name}: {run.status} at epoch {reached:g}{of}: included with its {rows} evaluations"
