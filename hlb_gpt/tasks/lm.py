"""WikiText language modelling: the GPT, its batch schedule, parameter groups and validation windows.

An epoch is one pass's worth of training tokens (windows are sampled at random offsets, so not literally one
pass): of the first --train-tokens of the split when it is given. `tokens` in the records counts training tokens
seen.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from hlb_gpt import components, distributed
from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.data import (TEST_SPLIT, BatchSampler, check_train_tokens, data_source, eval_windows, first_tokens,
                          get_tokenizer, load_data)
from hlb_gpt.device import attention_for, resolve_precision
from hlb_gpt.finetune import count_trainable, load_base, prepare_model
from hlb_gpt.flops import flops_per_token
from hlb_gpt.model import GPT, GPTConfig, gpt_config
from hlb_gpt.optim import make_scheduler, param_groups
from hlb_gpt.records import read_run
from hlb_gpt.tasks import Batch
from hlb_gpt.units import loss_units

# hlb-gpt's sequence-length warmup: start short, double every SEQ_GROWTH_STEPS steps, same tokens per batch.
SEQ_START = 32
SEQ_GROWTH_STEPS = 80


# ----------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class BatchSchedule:
    """Sequence length and batch size at each step: a function of the step alone, never of the loss."""

    seq_len: int
    batch_size: int
    seq_warmup: bool

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    def length_at(self, step: int) -> int:
        if not self.seq_warmup or self.seq_len <= SEQ_START:
            return self.seq_len
        return min(SEQ_START * 2 ** (step // SEQ_GROWTH_STEPS), self.seq_len)

    def batch_at(self, step: int) -> int:
        return self.tokens_per_step // self.length_at(step)

    def steps_for(self, tokens: float) -> int:
        """Steps needed to see at least `tokens` training tokens.

        In closed form, phase by phase: a walk step by step takes minutes for `--epochs 1e9`. The warm-up has
        a few phases of SEQ_GROWTH_STEPS steps of constant tokens per step, then every step has the same tokens.
        """
        step, seen = 0, 0
        while self.length_at(step) < self.seq_len:  # the warm-up phases: at most log2(seq_len / SEQ_START)
            per_step = self.batch_at(step) * self.length_at(step)
            if seen + SEQ_GROWTH_STEPS * per_step >= tokens:
                return step + _steps_to_cover(tokens, seen, per_step)
            step, seen = step + SEQ_GROWTH_STEPS, seen + SEQ_GROWTH_STEPS * per_step
        return step + _steps_to_cover(tokens, seen, self.batch_at(step) * self.length_at(step))


def _steps_to_cover(tokens: float, seen: int, per_step: int) -> int:
    """The least n >= 0 with seen + n * per_step >= tokens, in exact arithmetic (a float quotient rounds)."""
    return max(0, math.ceil((Fraction(tokens) - seen) / per_step))


def planned_steps(cfg: RunConfig, n_train: int) -> int:
    """The steps a run of `cfg` takes on `n_train` training tokens: --epochs of them, or --max-steps if fewer."""
    schedule = BatchSchedule(cfg.seq_len, cfg.batch_size, cfg.seq_warmup)
    return min(schedule.steps_for(cfg.epochs * n_train), cfg.max_steps or math.inf)


# ----------------------------------------------------------------------------------------------- parts


def build_optimizer(cfg: RunConfig, named_params: list[tuple[str, nn.Parameter]], device: torch.device,
                    compile: bool = False):
    """The optimizer over the model's parameter groups (decayed matrices, the rest), and its lr schedule."""
    groups = param_groups(named_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = components.optimizer_of(vars(cfg)).build(cfg, groups, device.type, compile)
    return optimizer, make_scheduler(optimizer, warmup_steps=cfg.warmup_steps)


@torch.no_grad()
def evaluate(forward: Callable[[Tensor, Tensor], Tensor], X: Tensor, Y: Tensor, batch_size: int,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> Tensor:
    """Mean token loss over the fixed validation windows (all windows have the same length)."""
    total = torch.zeros((), device=X.device)
    for i in range(0, len(X), batch_size):
        with autocast():
            total += forward(X[i:i + batch_size], Y[i:i + batch_size]).float() * len(X[i:i + batch_size])
    return total / len(X)


def attention(cfg: RunConfig, device: torch.device, compile: bool) -> str:
    """The attention kernel the run trains with; ConfigError when the device cannot run the one asked for."""
    return attention_for(cfg.attention, device, compile, cfg.width // GPTConfig.qk_div)


def check_optimizer(cfg: RunConfig) -> None:
    """Refuse an optimizer this torch does not have (ConfigError, one line)."""
    components.optimizer_of(vars(cfg)).available()


@functools.lru_cache(maxsize=None)
def _train_split_size(dataset: str, tokenizer: str, cache: str, data_dir: str | None) -> int:
    """Tokens of a training split, read once per process: every run of a sweep with --train-tokens asks."""
    data = load_data(dataset, get_tokenizer(tokenizer), Path(cache), Path(data_dir) if data_dir else None)
    return len(data.tokens["train"])


@functools.lru_cache(maxsize=None)
def _count_params(config: GPTConfig) -> int:
    with torch.device("meta"):
        return GPT(config).num_params()


# ----------------------------------------------------------------------------------------------- the task


def reached(row: dict[str, Any], target_loss: float | None) -> bool:
    """Whether the evaluation that wrote `row` reached --target-loss: a validation loss at or below it, after
    training began (the untrained model's evaluation at step 0 reaches no target, as with --target-acc)."""
    return target_loss is not None and row["step"] > 0 and row.get("val_loss", math.nan) <= target_loss


class LanguageModel:
    """WikiText (or a --data-dir) with the GPT: the `Task` the trainer runs for --task lm."""

    dynamic_dims = (0, 1)  # batch and sequence length vary: one compiled graph serves the sequence-length warm-up

    @staticmethod
    def planned_steps(cfg: RunConfig, n_train: int) -> int:
        return planned_steps(cfg, n_train)

    @staticmethod
    def count_params(cfg: RunConfig) -> int:
        if cfg.lora_rank or cfg.train_only:  # fine-tuning trains (and filters) the adapters or a few components
            return count_trainable(cfg)
        return _count_params(gpt_config(cfg))

    @staticmethod
    def vocab_size(cfg: RunConfig) -> int:
        return gpt_config(cfg).vocab_size

    @staticmethod
    def check(cfg: RunConfig, device: torch.device, compile: bool) -> None:
        attention(cfg, device, compile)
        check_optimizer(cfg)
        if cfg.train_tokens_limit is not None:  # before a sweep's first run, not once the runs before it trained
            check_train_tokens(cfg.train_tokens_limit,
                               _train_split_size(cfg.dataset, cfg.tokenizer, cfg.data_cache, cfg.data_dir))

    def __init__(self, cfg: RunConfig, device: torch.device, ddp: distributed.Dist, compile: bool) -> None:
        self.cfg, self.device, self.compile = cfg, device, compile
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.precision = resolve_precision(device, cfg.precision)
        self.attention = attention(cfg, device, compile)
        check_optimizer(cfg)
        if cfg.batch_size % (cfg.grad_accum * ddp.world_size):
            raise ConfigError(f"--batch-size ({cfg.batch_size}) must be divisible by --grad-accum x ranks "
                              f"({cfg.grad_accum} x {ddp.world_size})")
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        self.architecture = gpt_config(cfg)  # what a step's FLOPs are counted from
        data_dir = Path(cfg.data_dir) if cfg.data_dir else None
        data = load_data(cfg.dataset, self.tokenizer, Path(cfg.data_cache), data_dir, test=cfg.eval_test)
        data = first_tokens(data, cfg.train_tokens_limit, self.tokenizer)  # its sha256: the text trained on
        tokens = data.tokens
        self.n_train = len(tokens["train"])
        if self.n_train < cfg.seq_len + 1:  # the sampler needs one window, the schedule more than zero tokens
            raise ConfigError(f"the training text has {self.n_train} tokens, fewer than --seq-len + 1 = "
                              f"{cfg.seq_len + 1}; use a shorter --seq-len or more training text")
        self.data_source = data_source(cfg.dataset, cfg.data_dir)
        self.text_sha256: dict[str, str] | None = {k: v for k, v in data.text_sha256.items() if k != TEST_SPLIT}
        self.schedule = BatchSchedule(cfg.seq_len, cfg.batch_size, cfg.seq_warmup)
        # The full length, which evaluation always has and training keeps after its warm-up: one specialised
        # graph for the rest of the run (no bounds checks, kernels for that size) instead of the dynamic one.
        self.static_sizes = {1: cfg.seq_len}
        self.sampler = BatchSampler(tokens["train"], seed=cfg.seed, device=device)
        eval_x, eval_y = eval_windows(tokens["valid"], cfg.seq_len, cfg.eval_tokens or None)
        self.eval_x, self.eval_y = eval_x.to(device), eval_y.to(device)
        self.eval_units = functools.partial(loss_units, "val", tokenizer=cfg.tokenizer, n_tokens=eval_y.numel(),
                                            n_bytes=self.tokenizer.n_bytes(eval_y))
        # The test windows wait on the CPU for the end of the run; made now, so a test split too short for one
        # window is refused before training, not after it.
        self.test: tuple[Tensor, Tensor] | None = None
        if cfg.eval_test:
            try:
                self.test = eval_windows(tokens[TEST_SPLIT], cfg.seq_len, None)
            except ValueError:
                raise ConfigError(f"--eval-test: the test split has {len(tokens[TEST_SPLIT])} tokens, fewer than "
                                  f"--seq-len + 1 = {cfg.seq_len + 1}") from None
            self.test_sha256 = data.text_sha256[TEST_SPLIT]
        # Evaluation goes in chunks of the per-rank micro-batch, which training has shown to fit.
        self.eval_batch = cfg.batch_size // (cfg.grad_accum * ddp.world_size)
        self.base: dict[str, Any] = {}  # a fine-tune's base (`finetune.Base.record`), once it is known

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        model = GPT(gpt_config(cfg, self.attention)).to(self.device)
        prepare_model(model, cfg)  # --lora-*, --train-only: before anything sees the parameters
        return model

    def begin(self, model: nn.Module, run_dir: Path, resumed: bool) -> None:
        if self.cfg.init_from is None:
            return
        if not resumed:
            self.base = load_base(model, self.cfg, run_dir.parent).record()
        elif not self.base:  # a checkpoint written before checkpoints held the base: as config.json recorded it
            recorded = read_run(run_dir).config
            self.base = {k: recorded[k] for k in ("init_checkpoint", "init_step", "init_sha256") if k in recorded}

    def build_optimizer(self, named_params: list[tuple[str, nn.Parameter]]):
        return build_optimizer(self.cfg, named_params, self.device, compile=self.compile)

    def describe(self, total_steps: int) -> str:
        return (f"{self.n_train:,} training tokens, {total_steps:,} steps of "
                f"{self.schedule.tokens_per_step:,} tokens")

    def record(self) -> dict[str, Any]:
        return self.base  # the checkpoint the weights came from, with --init-from

    def batch(self, step: int) -> Batch:
        length, batch = self.schedule.length_at(step), self.schedule.batch_at(step)
        x, y = self.sampler.sample(batch, length)
        return Batch(x, y, items=batch * length, flops=flops_per_token(self.architecture, length) * batch * length)

    def loss(self, model: Callable[..., Tensor], x: Tensor, y: Tensor) -> Tensor:
        return model(x, y)

    def evaluate(self, model: Callable[..., Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
        loss = evaluate(model, self.eval_x, self.eval_y, self.eval_batch, autocast).item()
        return {"val_loss": loss, **self.eval_units(loss)}

    def evaluate_end(self, model: Callable[..., Tensor],
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Any]:
        """With --eval-test, the loss over every whole window of the test split, in nats and in its units."""
        if self.test is None:
            return {}
        x, y = self.test
        loss = evaluate(model, x.to(self.device), y.to(self.device), self.eval_batch, autocast).item()
        units = loss_units("test", loss, self.cfg.tokenizer, y.numel(), self.tokenizer.n_bytes(y))
        return {"test_loss": loss, **units, "test_tokens": y.numel(), "test_text_sha256": self.test_sha256}

    def should_stop(self, row: dict[str, Any]) -> str | None:
        if not reached(row, self.cfg.target_loss):
            return None
        return f"validation loss {row['val_loss']:.4f} <= {self.cfg.target_loss:g}"

    def summary(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        first = next((row for row in metrics if reached(row, self.cfg.target_loss)), None)
        return {"target_loss": self.cfg.target_loss, "steps_to_target": first["step"] if first else None,
                "time_to_target_s": first["time_s"] if first else None}

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base} if self.base else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = state.get("base", {})
