"""The optimizers a run can use (--optimizer): what each reads, refuses, builds and is called.

The optimizers themselves live in `hlb_gpt.optim`; an entry here says how a run's settings become one, and what
the training loop and the sweep need to know of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # `hlb_gpt.config` reads this module for --optimizer's default and help: imported where used
    from hlb_gpt.config import RunConfig

DEFAULT = "adamw"  # --optimizer's default
# --optimizer muon: Muon's lr for the block matrices, the best of 0.005, 0.01, 0.02, 0.03, 0.05 by val loss after
# 150 steps on `tiny` (mini, bytes, batch 4); and torch's momentum.
MUON_LR = 0.02
MUON_MOMENTUM = 0.95


def _no_check(cfg: RunConfig) -> None:
    pass


def _available() -> None:
    pass


@dataclass(frozen=True)
class Optimizer:
    name: str
    build: Callable[..., Any]
    """(cfg, groups from `optim.param_groups`, device type, compile) -> a torch optimizer."""
    plain: str
    """Its unfiltered counterpart: the optimizer of the baseline `--baseline` adds beside its runs."""
    title: str = ""
    """Its name in compare's notes: `AdamW`."""
    settings: tuple[str, ...] = ()
    """The RunConfig fields it alone reads; ignored (compare) in runs of other optimizers."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Values of its own settings left None; runs of other optimizers record them None and must not set them."""
    shown: tuple[tuple[str, str, str], ...] = ()
    """For an optimizer that filters: (setting, folder prefix, label prefix), as `Filter.shown`."""
    filters: bool = False
    """It filters gradients itself (GrokAdamW): a filtered run without --grokfast, which it refuses."""
    check: Callable[[RunConfig], None] = _no_check
    """Raises ConfigError for settings it refuses."""
    available: Callable[[], None] = _available
    """Raises ConfigError when this torch lacks it."""
    on_evaluation: Callable[[Any, float, float], None] | None = None
    """(optimizer, train loss, val loss) after each evaluation that followed a step: GrokAdamW's grokking signal."""
    state_copies: int = 2
    """Parameter-sized copies of state it keeps, at most (the pre-flight memory and disk checks): AdamW's two
    moments unless it says otherwise."""
    help: str = ""
    """What it is, for --optimizer's help."""


def _adamw(cfg: RunConfig, groups: list[dict], device_type: str, compile: bool) -> Any:
    from hlb_gpt.optim import make_optimizer

    return make_optimizer(groups, device_type=device_type)


def _grokadamw(cfg: RunConfig, groups: list[dict], device_type: str, compile: bool) -> Any:
    from hlb_gpt.optim import GrokAdamW

    return GrokAdamW(groups, compile=compile, alpha_init=cfg.alpha, lamb=cfg.gain, gamma=cfg.grok_gamma,
                     kappa=cfg.grok_kappa)


def _grokking_signal(optimizer: Any, train_loss: float, val_loss: float) -> None:
    optimizer.set_grokking_signal(train_loss, val_loss)  # it reads the gap between val and train loss


def _muon(cfg: RunConfig, groups: list[dict], device_type: str, compile: bool) -> Any:
    from hlb_gpt.optim import make_muon  # Muon for the block matrices, AdamW for the rest

    # Its checkpoints hold the two optimizers' states under these names.
    return make_muon(groups, cfg.muon_lr, cfg.muon_momentum, device_type=device_type, keys=("muon", "adamw"))


def _check_muon(cfg: RunConfig) -> None:
    from hlb_gpt.config import MUON_MATRICES, ConfigError, _default, _split, flag

    grok = [flag(name) for name in ("grok_kappa", "grok_gamma") if getattr(cfg, name) != _default(name)]
    if grok:  # --optimizer takes one name, so GrokAdamW's own settings are the one way to ask for both
        raise ConfigError(f"{', '.join(grok)}: GrokAdamW settings, and GrokAdamW does not combine with "
                          "--optimizer muon; drop them")
    if not (cfg.muon_lr > 0 and math.isfinite(cfg.muon_lr)):
        raise ConfigError(f"--muon-lr must be a positive number (got {cfg.muon_lr})")
    if not (0 <= cfg.muon_momentum < 1):
        raise ConfigError(f"--muon-momentum must be in [0, 1) (got {cfg.muon_momentum})")
    if cfg.lora_rank == 0 and cfg.train_only is not None and not set(_split(cfg.train_only)) & set(MUON_MATRICES):
        raise ConfigError(f"--optimizer muon trains block matrices ({', '.join(MUON_MATRICES)}) or LoRA adapters, and "
                          f"--train-only {cfg.train_only} trains none; add one of them, or --lora-rank, or drop "
                          "--optimizer muon")


def _muon_available() -> None:
    import torch

    from hlb_gpt.config import ConfigError

    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer("adamw", _adamw, plain="adamw", title="AdamW"),
    # AdamW with a Grokfast EMA inside: filtered by itself, its baseline is AdamW. State: two moments and the EMA.
    "grokadamw": Optimizer("grokadamw", _grokadamw, plain="adamw", title="GrokAdamW",
                           settings=("alpha", "gain", "grok_kappa", "grok_gamma"),
                           shown=(("alpha", "a", "α"), ("gain", "g", "g")), filters=True,
                           on_evaluation=_grokking_signal, state_copies=3,
                           help="AdamW with a built-in Grokfast EMA (uses --alpha, --gain)"),
    # State: the momentum of the matrices, AdamW's two moments for the rest; at most two copies, as AdamW.
    "muon": Optimizer("muon", _muon, plain="muon", title="Muon", settings=("muon_lr", "muon_momentum"),
                      defaults={"muon_lr": MUON_LR, "muon_momentum": MUON_MOMENTUM}, check=_check_muon,
                      available=_muon_available, help="Muon for the block matrices, AdamW for the rest"),
}
