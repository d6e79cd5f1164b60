"""A trained language model read back from its run folder: the architecture from config.json, the weights from a
checkpoint, and the tokenizer it was trained with. `sample` and `export` read runs only through this module.

A checkpoint holds the model's `state_dict`. Keys under torch.compile's `_orig_mod.` or DDP's `module.` are
accepted (a wrapped model's state_dict has them), and a LoRA fine-tune's adapters are merged into the weights they
adapt (`finetune.merged_state_dict`), so every run reads back as a plain `model.GPT`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hlb_gpt import components
from hlb_gpt.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from hlb_gpt.config import MAY_CHANGE_ON_RESUME, ConfigError, RunConfig, flag
from hlb_gpt.data import Tokenizer, get_tokenizer
from hlb_gpt.finetune import merged_state_dict
from hlb_gpt.model import GPT, gpt_config
from hlb_gpt.records import CorruptRecord, Run, is_run_dir, read_run


@dataclass
class Trained:
    """A run's model with the weights of one checkpoint, in eval mode on the CPU."""

    model: GPT
    tokenizer: Tokenizer
    config: dict[str, Any]  # the run's config.json
    checkpoint: Path
    step: int | None  # the optimizer step the checkpoint was written at
    status: str | None  # the run's summary status; None if it has no summary (running or killed)


def read_lm_run(run_dir: Path) -> Run:
    """The records of a language-model run; ConfigError (one line) for anything else."""
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir}: not a run folder (it has no config.json)")
    try:
        run = read_run(run_dir)
    except CorruptRecord as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(run.config, dict):
        raise ConfigError(f"{run_dir}/config.json is not a JSON object")
    task = components.task_of(run.config)
    if not task.holds_text:
        raise ConfigError(f"{run_dir} is a --task {task.name} run; only language-model runs (--task lm) hold text")
    return run


def load_trained(run_dir: Path, checkpoint: Path | None = None) -> Trained:
    """The run's model with the weights of `checkpoint`, by default the run's latest (its final one once the run
    completed). Every problem is a one-line ConfigError: no run, not a language model, no checkpoint, a file that
    is not a checkpoint, a damaged checkpoint, another run's checkpoint, or weights that do not fit the recorded
    architecture."""
    run_dir = Path(run_dir)
    run = read_lm_run(run_dir)
    config = run.config
    if checkpoint is None:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"{run_dir} has no checkpoint (it ran with --checkpoint-every 0, or stopped before "
                              "its first one)")
    check_checkpoint_file(Path(checkpoint))
    try:
        state = load_checkpoint(Path(checkpoint))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"{checkpoint} is not a training checkpoint (it has no model weights)")
    check_belongs(state.get("config"), config, checkpoint, run_dir)
    tokenizer = get_tokenizer(config["tokenizer"])
    model = GPT(gpt_config(config))
    try:
        model.load_state_dict(merged_state_dict(state["model"], config.get("lora_alpha", 0),
                                                config.get("lora_rank", 0)))
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors: not this run's model
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"{checkpoint} does not fit the architecture in {run_dir}/config.json ({first})") from None
    loop = state.get("loop")
    step = loop.get("step") if isinstance(loop, dict) else None
    return Trained(model.eval(), tokenizer, config, Path(checkpoint), step, run.status)


def check_checkpoint_file(path: Path) -> None:
    """A one-line error for a file that is no checkpoint at all (a config.json given as --checkpoint): the
    checkpoints training writes are zip archives, as torch.save makes them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if head and head != b"PK\x03\x04":  # an empty file is a truncated checkpoint, and load_checkpoint says so
        raise ConfigError(f"{path} is not a checkpoint (a run's checkpoints are the zip files "
                          "checkpoints/step-*.pt in its folder)")


def check_belongs(saved: Any, config: dict[str, Any], checkpoint: Path, run_dir: Path) -> None:
    """A one-line error unless the checkpoint was written by this run: its settings must be the run's, but for
    those a resumed run may change (as `--resume` checks them). Otherwise the model would be another run's
    weights under this run's name, and `export` would record this run's config with them."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{checkpoint} records no settings, so it cannot be checked against {run_dir}/config.json")
    differ = [f"{flag(f.name)}: {saved.get(f.name, f.default)!r} vs {config.get(f.name, f.default)!r}"
              for f in fields(RunConfig) if f.name not in MAY_CHANGE_ON_RESUME
              and saved.get(f.name, f.default) != config.get(f.name, f.default)]
    if differ:
        raise ConfigError(f"{checkpoint} is not a checkpoint of {run_dir}: it was trained with other settings "
                          f"(checkpoint vs run): {'; '.join(differ)}")
