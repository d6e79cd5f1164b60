"""The run folder: config.json, metrics.jsonl and summary.json.

`compare` reads runs only through this module, so the format is written down once:
- config.json: every resolved setting, plus the seed, versions and device (written before training starts).
- metrics.jsonl: one JSON object per evaluation, flushed as it is written so a killed run keeps its rows.
- summary.json: written atomically at the end; its `status` is completed, diverged, interrupted or failed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"

# Keys of every metrics.jsonl row, in order. Adding a key never renames another.
METRIC_KEYS = (
    "epoch", "step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "ema_ratio", "time_s", "tokens_per_s",
)
STATUSES = ("completed", "diverged", "interrupted", "failed")


def temporary_name(path: Path) -> Path:
    """A name beside `path` that no other writer uses (its PID and a random part), so that processes writing the
    same file at once never write into each other's temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers see the old or the new file.
    The temporary file is removed if anything fails."""
    tmp = temporary_name(Path(path))
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    """Writes one run folder. Metrics rows are appended and flushed one at a time."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.run_dir / CONFIG, config)

    def start_metrics(self) -> None:
        self.rewrite_metrics([])

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Start the metrics file over with `rows`: none for a fresh run, a checkpoint's rows for a resumed one
        (rows written after that checkpoint are dropped: the resumed run writes them again)."""
        atomic_write_text(self.run_dir / METRICS, "".join(json.dumps(_finite_or_null(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        missing = [k for k in METRIC_KEYS if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(_finite_or_null(row)) + "\n")
            f.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        if summary.get("status") not in STATUSES:
            raise ValueError(f"summary status must be one of {STATUSES} (got {summary.get('status')!r})")
        atomic_write_json(self.run_dir / SUMMARY, summary)


@dataclass
class Run:
    """What a finished or unfinished run folder holds."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def status(self) -> str | None:
        return None if self.summary is None else self.summary.get("status")


def read_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    metrics = []
    metrics_path = run_dir / METRICS
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a row cut short by a kill: everything before it is intact
    summary_path = run_dir / SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    return Run(run_dir, config, metrics, summary)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()
