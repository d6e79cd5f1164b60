"""The run folder's JSON records: config.json, metrics.jsonl and summary.json.

The one writer and reader of them (`compare` reads runs only through here). Writes are atomic or flushed per
row. What each file and column holds: docs/DESIGN.md, section 9 (Run records).
"""

from __future__ import annotations

import errno
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hlb_gpt.durable import write_durably

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"

# Keys of every metrics.jsonl row, in order. Adding a key never renames another.
METRIC_KEYS = (
    "epoch", "step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "ema_ratio", "time_s", "tokens_per_s",
)
STATUSES = ("completed", "diverged", "interrupted", "failed")


class RecordWriteError(OSError):
    """A record that could not be written (a full disk); the message is one line naming the file and why."""


class CorruptRecord(ValueError):
    """A record file that is not valid JSON; the message names the file."""


def _write_error(path: Path, error: OSError) -> RecordWriteError:
    reason = "no space left on the device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return RecordWriteError(error.errno, f"cannot write {path}: {reason}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers see the old or the new file (`durable.write_durably`). A write that fails (a full disk) leaves the
    old file and no temporary one, and raises RecordWriteError."""
    try:
        write_durably(Path(path), lambda f: f.write(data))
    except OSError as error:
        raise _write_error(path, error) from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_finite_or_null(obj), indent=2, sort_keys=False) + "\n")


def _finite_or_null(obj: Any) -> Any:
    """JSON has no NaN or Infinity; record them as null so every reader can parse the files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


class RunWriter:
    """Writes one run folder. Metrics rows are appended and flushed one at a time.

    `guard` is called before every write and raises to refuse it: the check of a lock this process may have lost
    (`locks.RunLock.check`), so that a run taken over by another process keeps that process's records alone."""

    def __init__(self, run_dir: Path, guard: Callable[[], None] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._guard = guard

    def check(self) -> None:
        """Raise if this process may no longer write the run (its `guard` says why); also before a checkpoint."""
        if self._guard is not None:
            self._guard()

    def begin(self, config: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
        """Start or continue the run before its first step: the summary of an earlier end goes first (a continued
        run is running, not completed), then the config it now runs with, then the metrics it continues from."""
        self.check()
        (self.run_dir / SUMMARY).unlink(missing_ok=True)
        self.write_config(config)
        self.rewrite_metrics(metrics)

    def write_config(self, config: dict[str, Any]) -> None:
        self.check()
        atomic_write_json(self.run_dir / CONFIG, config)

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Start the metrics file over with `rows`: none for a fresh run, a checkpoint's rows for a resumed one
        (rows written after that checkpoint are dropped: the resumed run writes them again)."""
        self.check()
        atomic_write_text(self.run_dir / METRICS, "".join(json.dumps(_finite_or_null(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        missing = [k for k in METRIC_KEYS if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        self.check()
        try:
            with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(_finite_or_null(row)) + "\n")
                f.flush()
        except OSError as error:
            raise _write_error(self.run_dir / METRICS, error) from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        if summary.get("status") not in STATUSES:
            raise ValueError(f"summary status must be one of {STATUSES} (got {summary.get('status')!r})")
        self.check()
        atomic_write_json(self.run_dir / SUMMARY, summary)


@dataclass
class Run:
    """What a finished or unfinished run folder holds."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)  # damaged metrics lines, as `file:line: why`

    @property
    def status(self) -> str | None:
        return None if self.summary is None else self.summary.get("status")


def read_run(run_dir: Path) -> Run:
    """The run folder's records. A config.json or summary.json that is not JSON raises CorruptRecord. A damaged
    line of metrics.jsonl is skipped and noted in `problems`, and the rows after it are read; only a last line
    cut short by a kill (no final newline: it was being written) is dropped silently."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / CONFIG)
    metrics, problems = [], []
    metrics_path = run_dir / METRICS
    if metrics_path.exists():
        text = metrics_path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines) and not text.endswith("\n"):
                    break  # a row cut short by a kill: everything before it is intact
                problems.append(f"{metrics_path}:{number}: not valid JSON ({exc.msg}), skipped")
    summary_path = run_dir / SUMMARY
    summary = _read_json(summary_path) if summary_path.exists() else None
    return Run(run_dir, config, metrics, summary, problems)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptRecord(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise CorruptRecord(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()
