"""What a run will need before it starts: the device memory of its peak step, and the disk of its checkpoints.

Both are estimates from the config alone (no model is built), so that a sweep refuses a run that cannot fit
before any work. The activation and logit terms are fitted to measured peaks of CPU runs (`bench/memory.py`);
the formula and the calibration table are in docs/DESIGN.md, section 9 (Run records: memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hlb_gpt import components
from hlb_gpt.config import RunConfig

# Bytes per (token x block x width) and per (token x vocabulary entry) that one micro-batch's forward and
# backward hold at their peak, by (precision, compiled), fitted by bench/memory.py to CPU runs (DESIGN.md,
# section 9). Eagerly the head holds the logits, their float32 log-softmax and its gradient (12 bytes);
# compiled, one copy of the logits in the autocast dtype: bf16 is CUDA's default, where the logits' gradient
# is allowed for beside them (4, where CPU Inductor measures 2).
BLOCK_BYTES = {("fp32", False): 72, ("bf16", False): 58, ("fp32", True): 52, ("bf16", True): 24}
LOGIT_BYTES = {("fp32", False): 12, ("bf16", False): 12, ("fp32", True): 4, ("bf16", True): 4}
# What a run holds besides: its data and evaluation windows, kernels' workspaces, the allocator's slack.
OVERHEAD_BYTES = 100 * 2**20
VALUE_BYTES = 4  # float32: the weights, their gradients and every copy of optimizer state


@dataclass(frozen=True)
class Footprint:
    """The bytes a run holds at its peak step, by what holds them."""

    training_state: int  # weights, gradients, the optimizer's state (its component's `state_copies`)
    filter_state: int  # the Grokfast filter's buffers (the MA ring: allocated at the first step)
    activations: int  # what the blocks keep for the backward of one micro-batch
    logits: int  # the logits, their float32 log-softmax and its gradient
    overhead: int = OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.training_state + self.filter_state + self.activations + self.logits + self.overhead

    def parts(self) -> dict[str, int]:
        return asdict(self)


def filter_copies(cfg: RunConfig) -> int:
    """Parameter-sized copies the Grokfast filter keeps, as its component says (the MA ring of `window` gradients
    and their sum; EMA's mu)."""
    return components.filter_of(vars(cfg)).copies(cfg) if cfg.grokfast else 0


def optimizer_copies(cfg: RunConfig) -> int:
    """Parameter-sized copies of state the optimizer keeps, as its component says."""
    return components.optimizer_of(vars(cfg)).state_copies


def filter_value_bytes(cfg: RunConfig) -> int:
    return 2 if cfg.filter_dtype == "bfloat16" else 4  # "param": the model's float32 parameters


def estimate(cfg: RunConfig, n_params: int, vocab: int, precision: str, compiled: bool,
             world_size: int = 1) -> Footprint:
    """The peak memory of one rank of a run of `cfg` that trains `n_params` parameters over `vocab` classes.

    A micro-batch is --batch-size / (--grad-accum x ranks) sequences; the sequence-length warm-up keeps the
    tokens per step, so the full length is the peak. Every block keeps a few tensors of (tokens x width) for its
    backward, and the head keeps the logits, their float32 log-softmax and then its gradient.
    """
    tokens = cfg.batch_size // (cfg.grad_accum * world_size) * cfg.seq_len
    key = (precision, compiled)
    return Footprint(
        training_state=(2 + optimizer_copies(cfg)) * VALUE_BYTES * n_params,
        filter_state=filter_copies(cfg) * n_params * filter_value_bytes(cfg),
        activations=BLOCK_BYTES[key] * tokens * cfg.depth * cfg.width,
        logits=LOGIT_BYTES[key] * tokens * vocab,
    )


def refusal(cfg: RunConfig, need: Footprint, n_params: int, available: int, device: Any) -> str:
    """Why a run whose `need` exceeds the `available` bytes of `device` is refused, naming the flags that help:
    the filter's when its state is the largest part, the batch's otherwise."""
    gib = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
    copies = filter_copies(cfg)
    others = need.total - need.filter_state
    if need.filter_state >= max(need.activations + need.logits, need.training_state):
        what = f"{copies:,} copies" if copies > 1 else "one copy"
        return (f"the {cfg.filter.upper()} filter's state needs about {gib(need.filter_state)} ({what} of "
                f"{n_params:,} parameters in {cfg.filter_dtype}) and a training step {gib(others)} more "
                f"(activations and logits {gib(need.activations + need.logits)}), more than the {gib(available)} of "
                f"{device} memory; use a smaller --window or --filter-dtype bfloat16")
    smaller = components.filter_of(vars(cfg)).smaller if cfg.grokfast else ""
    window = f" or {smaller}" if smaller else ""
    return (f"a training step needs about {gib(need.total)} of {device} memory (activations and logits "
            f"{gib(need.activations + need.logits)}, weights, gradients and optimizer {gib(need.training_state)}, "
            f"filter {gib(need.filter_state)}), more than the {gib(available)} it has; use a smaller --batch-size, "
            f"more --grad-accum or a shorter --seq-len{window}")


def checkpoint_bytes(cfg: RunConfig, n_params: int) -> int:
    """The size of one checkpoint file: the weights, the optimizer's state and the filter's (the MA ring), all as
    the run holds them; the metrics rows, sampler and RNG states are small beside them."""
    optimizer = (1 + optimizer_copies(cfg)) * VALUE_BYTES * n_params
    return optimizer + filter_copies(cfg) * n_params * filter_value_bytes(cfg)


def checkpoint_disk_bytes(cfg: RunConfig, n_params: int) -> int:
    """Disk a run's checkpoints take at most: the kept ones and the one being written beside them."""
    if not cfg.checkpoint_cadence:
        return 0
    return (cfg.keep_checkpoints + 1) * checkpoint_bytes(cfg, n_params)
