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

N is at most `MAX_POINTS`: between two evaluations a curve is a straight line, so a finer grid tells a statistic
nothing new, and each point costs memory (about 100 bytes per point while a curve is resampled).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


MAX_POINTS = 1_000_000


def epoch_grid(last_epochs: Iterable[float], n: int) -> np.ndarray:
    """N evenly spaced epochs from 0 to the largest of `last_epochs` (both ends included)."""
    if n < 2:
        raise ValueError(f"--resample needs N >= 2 points (got {n})")
    if n > MAX_POINTS:
        raise ValueError(f"--resample N must be at most {MAX_POINTS:,} points (got {n:,}): curves are straight "
                         "between evaluations, so more points add nothing but memory")
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
    out = np.empty(reached.size)
    good = np.where(np.isfinite(values), values, worst)
    for start in range(0, reached.size, _BLOCK):  # in blocks: their temporaries stay small and in cache
        out[start:start + _BLOCK] = _values_at(reached[start:start + _BLOCK], epochs, values, good, worst)
    return reached, out


_BLOCK = 1 << 16


def _values_at(x: np.ndarray, epochs: np.ndarray, values: np.ndarray, good: np.ndarray, worst: float) -> np.ndarray:
    """The rules of the module at every point of `x` at once (`epochs` ascending, at least one; `good` the
    values with bad ones replaced by `worst`)."""
    n = len(epochs)
    # The first evaluation at or after each point. Of equal epochs the first wins: compare puts a diverged run's
    # worst-value row at the epoch it stopped, which may be that of its last evaluation, and the evaluation was
    # taken before it stopped.
    right = np.searchsorted(epochs, x, side="left")
    at, before = np.minimum(right, n - 1), np.maximum(right - 1, 0)
    a, b = values[before], values[at]
    with np.errstate(all="ignore"):  # lanes with a bad value or outside the evaluations are replaced below
        t = (x - epochs[before]) / (epochs[at] - epochs[before])
        out = np.where(np.isfinite(a) & np.isfinite(b), a + t * (b - a), worst)
    out[right == 0] = good[0]  # before the first evaluation: its value, held
    out[right == n] = worst  # past the last evaluation: only a diverged run gets here
    on = (right < n) & (epochs[at] == x)
    out[on] = good[at[on]]  # exactly on an evaluation: its value
    return out
