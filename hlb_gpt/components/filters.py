"""The Grokfast gradient filters a run can use (--filter): what each reads, builds, keeps and is called.

The kernels live in `hlb_gpt.grokfast`; a filter here says how a run's settings become one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from hlb_gpt.config import RunConfig


def _no_check(cfg: RunConfig) -> None:
    pass


@dataclass(frozen=True)
class Filter:
    name: str
    settings: tuple[str, ...]
    """The RunConfig fields it reads besides --filter and --filter-dtype; the others are ignored in its runs."""
    shown: tuple[tuple[str, str, str], ...]
    """(setting, folder prefix, label prefix) in the order its folder part and label name them: `ema-a0.9-g0.1`."""
    build: Callable[..., Any]
    """(cfg, named_params, dtype, compile) -> a `grokfast.GradFilter`."""
    copies: Callable[[RunConfig], int]
    """Parameter-sized copies of state it keeps (the pre-flight memory and disk checks)."""
    check: Callable[[RunConfig], None] = _no_check
    """Raises ConfigError for settings it refuses."""
    smaller: str = ""
    """The flag that shrinks its state, for the memory refusal: `a smaller --window`."""
    help: str = ""
    """What it does, for --filter's help: `exponential moving average`."""


def _ema(cfg: RunConfig, named_params: list, dtype: Any, compile: bool) -> Any:
    from hlb_gpt.grokfast import EMAFilter

    return EMAFilter(named_params, alpha=cfg.alpha, gain=cfg.gain, dtype=dtype, compile=compile, kind="ema")


def _ma(cfg: RunConfig, named_params: list, dtype: Any, compile: bool) -> Any:
    from hlb_gpt.grokfast import MAFilter

    return MAFilter(named_params, window=cfg.window, gain=cfg.gain, dtype=dtype, compile=compile, kind="ma")


# The kernels tag their checkpointed state with the name given here (`kind`): records hold these tags.
FILTERS: dict[str, Filter] = {
    "ema": Filter("ema", ("alpha", "gain"), (("alpha", "a", "α"), ("gain", "g", "g")), _ema, lambda cfg: 1,
                  help="exponential moving average"),
    # The ring of `window` gradients and their sum.
    "ma": Filter("ma", ("window", "gain"), (("window", "w", "w"), ("gain", "g", "g")), _ma,
                 lambda cfg: cfg.window + 1, smaller="a smaller --window", help="mean of the last --window gradients"),
}
DEFAULT = "ema"  # --filter's default
