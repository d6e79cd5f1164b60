"""Curves on one epoch grid, for `compare --resample N`.

Runs evaluated at different cadences are not comparable as they are: under `best:N` a run evaluated more often
has more chances at a low value, and its `mean` weighs the epochs differently. Interpolating every curve onto the
same N epochs first gives every run that got that far the same points to choose from. The rules:

- The grid is N evenly spaced epochs from 0 to the largest last epoch among the compared runs (`epoch_grid`).
- Between two evaluations a point lies on the straight line joining them (linear in the epoch).
- A point before a run's first evaluation takes the first value: held, never extrapolated.
- Points after a run's last evaluation are left out, so a run that stopped or ran shorter has a shorter curve
  and its `final` is its value at the last grid point it reached.
- A bad value (non-finite: a missing or NaN evaluation, or the worst-value row compare adds where a run
  diverged) is the worst value, and so is every point between it and its neighbours: the curve went bad
  somewhere in that interval and interpolating towards infinity says nothing better. A point exactly on a
  good evaluation keeps it.
- A diverged run is not shortened: from its last evaluation (the divergence) to the end of the grid its points
  are the worst value, as compare counts it from there without resampling. Dropping them would judge a run
  that blew up early on its good early points alone.

The epochs a statistic covers (`first:K`, `last:K`) and the metric are applied afterwards, to the grid points,
with no one-step slack: grid points are exact epochs.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def epoch_grid(last_epochs: Iterable[float], n: int) -> np.ndarray:
    """N evenly spaced epochs from 0 to the largest of `last_epochs` (both ends included)."""
    if n < 2:
        raise ValueError(f"--resample needs N >= 2 points (got {n})")
    return np.linspace(0.0, max(last_epochs, default=0.0), n)


def resample_curve(epochs: Sequence, values: Sequence, grid: np.ndarray, worst: float = math.inf,
                   diverged: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One run's curve (epochs ascending, values) at the grid points it reached: (those epochs, values).

    `worst` replaces bad values (see the module rules); `diverged` keeps the points after the last evaluation,
    at the worst value, instead of leaving them out.
    """
    epochs, values, grid = (np.asarray(a, dtype=float) for a in (epochs, values, grid))
    if epochs.shape != values.shape:
        raise ValueError(f"a curve needs one value per epoch (got {epochs.size} epochs, {values.size} values)")
    if epochs.size == 0:
        return grid[:0], np.empty(0)
    if np.any(np.diff(epochs) < 0):
        raise ValueError("a curve's epochs must be ascending")
    reached = grid if diverged else grid[grid <= epochs[-1]]
    return reached, np.array([_value_at(x, epochs, values, worst) for x in reached], dtype=float)


def _value_at(x: float, epochs: np.ndarray, values: np.ndarray, worst: float) -> float:
    # The first evaluation at or after x. Of equal epochs the first wins: compare puts a diverged run's
    # worst-value row at the epoch it stopped, which may be that of its last evaluation, and the evaluation was
    # taken before it stopped.
    right = int(np.searchsorted(epochs, x, side="left"))
    if right < len(epochs) and epochs[right] == x:
        return _good_or(values[right], worst)
    if right == 0:  # before the first evaluation: its value, held
        return _good_or(values[0], worst)
    if right == len(epochs):  # past the last evaluation: only a diverged run gets here
        return worst
    a, b = values[right - 1], values[right]
    if not (math.isfinite(a) and math.isfinite(b)):
        return worst
    t = (x - epochs[right - 1]) / (epochs[right] - epochs[right - 1])
    return float(a + t * (b - a))


def _good_or(value: float, worst: float) -> float:
    return float(value) if math.isfinite(value) else worst
