"""The tasks a run can train on (--task): their presets, refusals, and what their runs support.

The trainer's side of a task (its data, model, loss and evaluation) is its class in `hlb_gpt.tasks`, imported
only when a run needs it: what config, compare, fine-tuning and `sample`/`export` ask of a task is declared here,
without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from hlb_gpt.config import RunConfig


@dataclass(frozen=True)
class Preset:
    depth: int
    width: int
    seq_len: int
    batch_size: int
    lr: float
    eval_tokens: int
    weight_decay: float = 0.01
    warmup_steps: int = 100
    checkpoint_every: float = 1.0  # epochs (see `config.parse_cadence`)


def _no_check(cfg: RunConfig) -> None:
    pass


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[], Any]
    """The trainer's class of the task (a `train.Task`)."""
    preset: str
    """Its default --preset."""
    presets: dict[str, Preset] = field(default_factory=dict)
    """The presets it brings (--preset choices: every task's)."""
    help: str = ""
    check: Callable[[RunConfig], None] = _no_check
    """Raises ConfigError for settings it refuses."""
    fine_tunes: bool = False
    """Its runs can start from another run's weights (--init-from, --lora-rank, --train-only)."""
    holds_text: bool = False
    """Its runs are language models: `sample` and `export` read them."""
    bf16: bool = False
    """--precision auto trains it in bf16 on a CUDA GPU with native bf16 (else fp32 everywhere)."""
    target: str = ""
    """The setting that stops its runs at a validation figure (`--target-loss`, `--target-acc`)."""
    records: tuple[str, ...] = ()
    """The keys its trainer adds to config.json (`record`): not settings."""


def _language_model() -> Any:
    from hlb_gpt.tasks.lm import LanguageModel

    return LanguageModel


def _check_lm(cfg: RunConfig) -> None:
    from hlb_gpt.config import ConfigError

    if 0 < cfg.eval_tokens < cfg.seq_len + 1:  # one window needs seq_len + 1 tokens
        raise ConfigError(f"--eval-tokens ({cfg.eval_tokens}) must be at least --seq-len + 1 = {cfg.seq_len + 1}, "
                          "or 0 for the whole validation split")


def _modular_arithmetic() -> Any:
    from hlb_gpt.tasks.modular import ModularArithmetic

    return ModularArithmetic


def _check_modular(cfg: RunConfig) -> None:
    from hlb_gpt.components.optimizers import DEFAULT
    from hlb_gpt.config import ConfigError

    if cfg.optimizer != DEFAULT:
        raise ConfigError("--task modular trains with Adam and L2 weight decay, as the published code; "
                          f"drop --optimizer {cfg.optimizer} (use --grokfast for the filter)")
    if cfg.gate != "none":
        raise ConfigError(f"--task modular has no gated blocks; drop --gate {cfg.gate}")
    if cfg.attention == "flex":
        raise ConfigError("--task modular attends over 4 tokens with its own model; drop --attention flex")


TASKS: dict[str, Task] = {
    "lm": Task("lm", _language_model, preset="hlb", presets={
        # hlb-gpt v0.4's 46M model. Its base lr follows hlb-gpt's fit 9e7 / ln(n_params)^8.8 * 2.62 at 46M
        # parameters; its batch of 64 x 1024 tokens is about what hlb-gpt fits on a 40 GB A100.
        "hlb": Preset(depth=8, width=384, seq_len=1024, batch_size=64, lr=2.5e-3, eval_tokens=153_600),
        # Laptop scale: an epoch of `mini` with --tokenizer bytes in well under a minute on 2 CPU cores.
        "tiny": Preset(depth=4, width=128, seq_len=256, batch_size=16, lr=2e-3, eval_tokens=65_536),
    }, help="WikiText language modelling", check=_check_lm, fine_tunes=True, holds_text=True, bf16=True,
       target="target_loss"),
    "modular": Task("modular", _modular_arithmetic, preset="modular", presets={
        # The grokking benchmark (after Lee et al. 2024): 2 layers of width 128, batches of 512,
        # Adam lr 1e-3 with a 10-step warmup, no weight decay unless given; sequences are `x op y =`.
        "modular": Preset(depth=2, width=128, seq_len=4, batch_size=512, lr=1e-3, eval_tokens=0,
                          weight_decay=0.0, warmup_steps=10, checkpoint_every=100.0),
    }, help="the (x * y) mod 97 grokking benchmark", check=_check_modular, records=("modular",),
       target="target_acc"),
}
DEFAULT = "lm"  # --task's default
