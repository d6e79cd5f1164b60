"""Optional mirroring of a run's records to Weights & Biases; the run folder stays the record.

wandb is imported only with `--wandb`; `WANDB_MODE=offline` keeps the run under `<run folder>/wandb/`. One run
folder is one wandb run: the folder keeps its wandb run's id, and a run that continues from its checkpoint
(resumed, extended, requeued) logs to that run again.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

from hlb_gpt.config import RunConfig
from hlb_gpt.durable import write_durably

WANDB_RUN_ID = "wandb-run-id"  # in the run folder: the id of the wandb run it logs to


class NoTracker:
    """Tracking switched off: every call does nothing, so the training loop needs no `if`."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The id of the wandb run the run in `run_dir` logs to: the one the folder keeps, if the run continues from a
    checkpoint (`resumed`); otherwise a new one, kept in the folder (written durably) before wandb is started, so a
    run killed at any moment continues its wandb run. A run trained again from its first step gets a new wandb run:
    the old one already holds rows at those steps."""
    path = Path(run_dir) / WANDB_RUN_ID
    if resumed and path.exists() and (kept := path.read_text().strip()):
        return kept
    alphabet = string.ascii_lowercase + string.digits  # wandb's own ids: 8 characters of these
    new = "".join(secrets.choice(alphabet) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, lambda f: f.write(new.encode()))
    return new


class WandbTracker(NoTracker):
    def __init__(self, cfg: RunConfig, run_dir: Path, resumed: bool = False):
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        self._run = wandb.init(
            project=cfg.wandb_project,
            name=run_dir.name,  # the grid point, e.g. ema-a0.9-g0.1-s0
            group=run_dir.parent.name,  # the sweep
            config=cfg.to_dict(),
            dir=str(run_dir),
            id=wandb_run_id(run_dir, resumed),
            resume="allow",  # the folder's wandb run if wandb has it, else a new one with that id
            reinit="finish_previous",  # a sweep trains its runs one after another in one process
        )

    def log(self, row: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None}
        flat.update({f"memory/{k}": v for k, v in summary.get("memory", {}).items()})
        self._run.summary.update(flat)
        self._run.finish(exit_code=0 if summary.get("status") == "completed" else 1)


def make_tracker(cfg: RunConfig, run_dir: Path, resumed: bool = False) -> NoTracker:
    """The run's tracker; `resumed`: the run continues from a checkpoint, so it continues its wandb run too."""
    return WandbTracker(cfg, run_dir, resumed) if cfg.wandb else NoTracker()
