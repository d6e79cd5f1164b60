"""What a run trains on (selected with --task): `lm`, WikiText language modelling; `modular`, the grokking benchmark.

Each task is one module with one class that `hlb_gpt.train.Task` describes; the trainer owns the loop.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    """One optimizer step's data, for every rank together: the trainer cuts it into ranks and micro-batches."""

    x: Tensor
    y: Tensor
    items: int
    """What the step adds to the run's `tokens` count: tokens (lm), equations (modular)."""
    weight: int = 1
    """The weight of the step's mean loss in the training loss of the next metrics row (1: a mean over steps)."""
    flops: float = math.nan
    """The step's training FLOPs, every rank's together, counted from the architecture (`hlb_gpt.flops`); NaN
    where the task does not count them (its FLOP/s and MFU are then unknown)."""
