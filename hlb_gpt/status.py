"""Where a sweep stands (`hlb-gpt status`): one line per run, from its folder and locks, and the sweep's
manifest `<out>/sweep.json`, which lists runs not begun yet and records the settings the sweep's runs share.
No torch here. See docs/DESIGN.md, section 10.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hlb_gpt.config import ConfigError, flag
from hlb_gpt.locks import DEFAULT_TIMEOUT_S, format_age, read_lock
from hlb_gpt.records import atomic_write_json, is_run_dir, read_run

MANIFEST = "sweep.json"
MANIFEST_LOCK = ".sweep.json.lock"  # held while a command reads, changes and rewrites the manifest
MANIFEST_WAIT_S = 300.0


@dataclass(frozen=True)
class RunState:
    name: str
    state: str  # pending, running, stale lock, unfinished, unreadable, or the summary's status
    detail: str  # who holds the lock, and how old its heartbeat is
    epochs: float | None
    val_loss: float | None

    def line(self, width: int) -> str:
        epochs = "-" if self.epochs is None else f"{self.epochs:.4g}"
        val = "-" if self.val_loss is None or not math.isfinite(self.val_loss) else f"{self.val_loss:.4f}"
        state = f"{self.state} {self.detail}".strip()
        return f"{self.name:<{width}}  {state:<44}  {epochs:>8}  {val:>8}"


def read_manifest(out: Path) -> list[str]:
    return _read_manifest(out)[0]


def _read_manifest(out: Path) -> tuple[list[str], dict[str, Any]]:
    """The run names and the recorded settings (none in manifests written before settings were recorded)."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
        names = list(manifest["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return [], {}
    settings = manifest.get("settings")
    return names, settings if isinstance(settings, dict) else {}


def write_manifest(out: Path, names: list[str], settings: dict[str, Any] | None = None) -> None:
    """Record the sweep's run names, adding to those of earlier commands on the same folder, and the `settings`
    its runs share. A setting already recorded must agree: a command whose settings differ is refused
    (ConfigError naming them) and records nothing. Workers starting together read, change and rewrite the
    manifest in turn, under a file lock beside it."""
    from filelock import FileLock, Timeout  # imported here: only sweeps need it

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(out / MANIFEST_LOCK, timeout=MANIFEST_WAIT_S):
            known, recorded = _read_manifest(out)
            mine = settings or {}
            differing = [f"{flag(k)}: {mine[k]!r} vs {recorded[k]!r}"
                         for k in mine if k in recorded and mine[k] != recorded[k]]
            if differing:
                raise ConfigError(f"{out} is a sweep with other settings (this command vs the sweep): "
                                  f"{'; '.join(differing)}; run it with the sweep's settings, or use another --out")
            merged = known + [n for n in names if n not in known]
            shared = {**recorded, **{k: v for k, v in mine.items() if k not in recorded}}
            if merged != known or shared != recorded:
                atomic_write_json(out / MANIFEST, {"runs": merged, "settings": shared})
    except Timeout:
        raise ConfigError(f"{out / MANIFEST_LOCK}: another process has held it for {MANIFEST_WAIT_S:.0f} s; "
                          "is a sweep command hanging?") from None


def run_state(run_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S, now: float | None = None) -> RunState:
    run_dir = Path(run_dir)
    epochs = val = None
    status, problem = None, None
    if is_run_dir(run_dir):
        try:
            run = read_run(run_dir)
            epochs, val = last_evaluation(run.metrics)
            if run.summary is None or isinstance(run.summary, dict):
                status = run.status or "unfinished"
            else:
                status, problem = "unreadable", "(summary.json is not an object)"
        except (OSError, ValueError) as exc:
            status, problem = "unreadable", f"({type(exc).__name__})"
    lock = read_lock(run_dir)
    state = lock.state(timeout_s, now) if lock is not None else None
    if state == "held":
        return RunState(run_dir.name, "running", f"on {lock.owner}", epochs, val)
    if state == "stale":
        return RunState(run_dir.name, "stale lock",
                        f"({lock.owner}, heartbeat {format_age(lock.heartbeat_age(now))} ago)", epochs, val)
    return RunState(run_dir.name, status or "pending", problem or "", epochs, val)


def sweep_states(out: Path, timeout_s: float = DEFAULT_TIMEOUT_S, now: float | None = None) -> list[RunState]:
    """Every run of the sweep: those its manifest names, in order, then any other run folder in `out` (or `out`
    itself, when it is a run folder)."""
    out = Path(out)
    names = read_manifest(out)
    if not names and is_run_dir(out):  # a run folder given on its own
        return [run_state(out, timeout_s, now)]
    others = sorted(p.name for p in out.iterdir()
                    if p.is_dir() and p.name not in names and (is_run_dir(p) or read_lock(p) is not None))
    return [run_state(out / name, timeout_s, now) for name in names + others]


def format_status(states: list[RunState]) -> str:
    width = max([len("run")] + [len(s.name) for s in states])
    header = f"{'run':<{width}}  {'state':<44}  {'epochs':>8}  {'val loss':>8}"
    counts = Counter(s.state for s in states)
    total = f"{len(states)} run{'s' * (len(states) != 1)}"
    if states:
        total += ": " + ", ".join(f"{n} {state}" for state, n in counts.most_common())
    return "\n".join([header, *(s.line(width) for s in states), total])


def last_evaluation(rows: list) -> tuple[float | None, float | None]:
    """(epoch, val_loss) of the last metrics row, passing over lines that are JSON but not rows (as compare
    does: a list, a string, an epoch that is not a number); a val_loss that is not a number is none."""
    for row in reversed(rows):
        if isinstance(row, dict) and _number(row.get("epoch")):
            val = row.get("val_loss")
            return float(row["epoch"]), float(val) if _number(val) else None
    return None, None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
