"""Optional mirroring of a run's records to Weights & Biases; the run folder stays the record.

wandb is imported only with `--wandb`; `WANDB_MODE=offline` keeps the run under `<run folder>/wandb/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hlb_gpt.config import RunConfig


class NoTracker:
    """Tracking switched off: every call does nothing, so the training loop needs no `if`."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbTracker(NoTracker):
    def __init__(self, cfg: RunConfig, run_dir: Path):
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        self._run = wandb.init(
            project=cfg.wandb_project,
            name=run_dir.name,  # the grid point, e.g. ema-a0.9-g0.1-s0
            group=run_dir.parent.name,  # the sweep
            config=cfg.to_dict(),
            dir=str(run_dir),
            reinit="finish_previous",
        )

    def log(self, row: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None}
        flat.update({f"memory/{k}": v for k, v in summary.get("memory", {}).items()})
        self._run.summary.update(flat)
        self._run.finish(exit_code=0 if summary.get("status") == "completed" else 1)


def make_tracker(cfg: RunConfig, run_dir: Path) -> NoTracker:
    return WandbTracker(cfg, run_dir) if cfg.wandb else NoTracker()
