"""The grokking benchmark: learn (x * y) mod 97 from half of its table, with and without Grokfast.

The setup follows the Grokfast paper's modular-arithmetic experiment (Lee et al. 2024, after Power et al. 2022):
equations `x op y = answer` for x in 0..96 and y in 1..96 (9,312 of them), half for training (a seeded split),
a 2-layer, width-128, 4-head transformer with learned positions that reads `x op y =` and predicts the answer
at the last position, Adam with coupled L2 weight decay, lr 1e-3, betas (0.9, 0.98), a 10-step linear warmup
then a constant lr, batches of 512. Unfiltered, validation accuracy climbs to 95% only after tens of thousands
of steps (it "groks"); with the Grokfast filter, in about a thousand.

What differs from the published code, and why:
- The model computes only what the loss reads: every position in the first blocks, but in the last block only
  the keys and values of every position and the query, MLP and head of the last one. The answer's logits are
  the same (to float rounding) as computing every position; the step costs about two thirds as much.
- Attention is `scaled_dot_product_attention` over a fused query/key/value matrix rather than
  `nn.MultiheadAttention`; the parameters and their initial distributions are the same.
- The position table has 4 rows (the published one has 5, one never used).
- The split comes from its own seeded generator, not from the global RNG after model initialisation, so a seed
  gives the same split on every device and whatever the model.
- Grokfast's EMA follows our filter's definition: the first step leaves the gradient unchanged (the published filter already
  multiplies it by 1 + gain). The first step has lr 0 in both (the warmup starts at 0), so only Adam's moment
  estimates see the difference.

Batches follow the published code: each epoch a seeded shuffle of the 4,656 training equations, cut into 10
batches (nine of 512, then 48), so an epoch is 10 steps and every training equation is seen once per epoch.

Records: `tokens` counts training equations seen (one predicted token each), `epoch` is equations seen / 4,656,
`tokens_per_s` is equations per second. Each metrics row adds `val_acc` (the whole validation set, one forward
pass) and `train_acc` (the epoch's training batches, each scored by the model that took the step on it, as the
published code does; `train_loss` likewise, weighted by batch size).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hlb_gpt import distributed
from hlb_gpt.compiling import FallbackCompiled, Lap, compile_record, fresh_start, graphs_compiled
from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.device import (PeakMemory, autocast_for, final_memory, format_memory, memory_breakdown, resolve_device,
                            resolve_precision, synchronize)
from hlb_gpt.optim import lr_lambda
from hlb_gpt.records import RunWriter
from hlb_gpt.tracking import make_tracker
from hlb_gpt.train import (Diverged, Interrupted, LoopState, Resumable, RunStatus, StepResult, StopSignals,
                           build_filter, config_record, eval_due, optimizer_step, run_summary)

logger = logging.getLogger(__name__)

P = 97
SEQ_LEN = 4  # x op y =
HEADS = 4
ADAM_BETAS = (0.9, 0.98)
# The batch order has its own generator, seeded apart from the split's, so a run does not draw both from one stream.
SAMPLER_SEED_OFFSET = 7919


# ----------------------------------------------------------------------------------------------- data


def modular_dataset(p: int = P, seed: int = 0, train_fraction: float = 0.5) -> dict[str, tuple[Tensor, Tensor]]:
    """All equations `x op y =` -> (x * y) mod p, split at random (seeded) into train and valid.

    Returns {"train": (X, y), "valid": (X, y)}: X int64 (n, 4) holds the tokens [x, op, y, eq] (the numbers are
    their own tokens, eq is p and op is p + 1, so the vocabulary has p + 2 tokens), y int64 (n,) the answers.
    """
    if p < 2:
        raise ValueError(f"p must be >= 2 (got {p})")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1) (got {train_fraction})")
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).unbind(1)  # (n,), (n,)
    X = torch.stack([x, torch.full_like(x, p + 1), y, torch.full_like(x, p)], dim=1)  # (n, 4)
    answers = x * y % p
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_train = int(len(X) * train_fraction)
    train, valid = order[:n_train], order[n_train:]
    return {"train": (X[train], answers[train]), "valid": (X[valid], answers[valid])}


class EpochSampler:
    """Shuffled passes over the training set, as the published code: each epoch a new seeded permutation, cut
    into batches in order, so the last batch of an epoch is the remainder (4,656 = 9 x 512 + 48).

    Permutations come from a CPU generator, so a seed gives the same batches on every device; `next()` returns
    indices on the device, where the data lives. `state_dict()` holds the generator and the epoch in progress.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1 (got {n}, {batch_size})")
        self.n, self.batch_size, self.device = n, batch_size, device
        self._generator = torch.Generator().manual_seed(seed + SAMPLER_SEED_OFFSET)
        self._order: Tensor | None = None  # this epoch's permutation (CPU), None before the first
        self._on_device: Tensor | None = None
        self._position = 0  # batches of this epoch handed out

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def next(self) -> Tensor:
        """Indices of the next batch (int64, on the device)."""
        if self._order is None or self._position == self.steps_per_epoch:
            self._set_order(torch.randperm(self.n, generator=self._generator))
        start = self._position * self.batch_size
        self._position += 1
        return self._on_device[start:start + self.batch_size]

    def _set_order(self, order: Tensor) -> None:
        self._order, self._position = order, 0
        if self.device.type == "cuda":
            order = order.pin_memory()  # so the copy is truly asynchronous
        self._on_device = order.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "order": self._order, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        if state["order"] is None:
            self._order, self._on_device, self._position = None, None, 0
        else:
            self._set_order(state["order"])
            self._position = state["position"]


# ----------------------------------------------------------------------------------------------- model


@dataclass
class ModularConfig:
    vocab_size: int = P + 2
    """Numbers 0..p-1, then eq and op."""
    depth: int = 2
    """Number of blocks (--depth)."""
    width: int = 128
    """Residual stream width (--width)."""
    heads: int = HEADS
    seq_len: int = SEQ_LEN
    """Rows of the learned position table."""
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "depth", "width", "heads", "seq_len", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.width % self.heads:
            raise ValueError(f"--width must be divisible by the {self.heads} heads (got {self.width})")


class ModularBlock(nn.Module):
    """Causal self-attention (4 heads) then a 4x GELU MLP, each added to the stream after a LayerNorm."""

    def __init__(self, config: ModularConfig) -> None:
        super().__init__()
        c = config
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.out = nn.Linear(c.width, c.width)
        self.norm2 = nn.LayerNorm(c.width)
        self.fc = nn.Linear(c.width, c.mlp_ratio * c.width)
        self.proj = nn.Linear(c.mlp_ratio * c.width, c.width)

    def _split_heads(self, t: Tensor) -> Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        """(B, T, C) -> (B, T, C); with `last_only`, (B, 1, C): the last position alone, which sees every key."""
        h = self.norm1(x)  # (B, T, C)
        C = h.shape[-1]
        if last_only:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(h[:, -1:], w[:C], b[:C])  # (B, 1, C)
            k, v = F.linear(h, w[C:], b[C:]).chunk(2, dim=-1)  # (B, T, C) each
            h = h[:, -1:]
        else:
            q, k, v = self.qkv(h).chunk(3, dim=-1)  # (B, T, C) each
        # A single query at the last position may see every key, so it needs no mask (is_causal would align
        # the mask top-left and let it see only the first key).
        att = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v),
                                             is_causal=not last_only)  # (B, H, T', C/H)
        att = att.transpose(1, 2).flatten(2)  # (B, T', C)
        # As in the published model, the stream continues from the normalised h, not from x: each block
        # renormalises its input. Kept, because the published hyperparameters were tuned on it.
        x = h + self.out(att)
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


class ModularTransformer(nn.Module):
    """Token + learned position embedding -> blocks -> LayerNorm -> head; the answer is read at the last position."""

    def __init__(self, config: ModularConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.seq_len, config.width)
        self.blocks = nn.ModuleList(ModularBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The published model's initial values: PyTorch's defaults for the modules it is built from.

        The grokking hyperparameters (weight decay, filter gain) were tuned against these scales (unit-variance
        embeddings, small linear layers), so they are kept rather than replaced by a scaled initialisation.
        """

        def default_linear(layer: nn.Linear) -> None:  # nn.Linear's own: U(+-1/sqrt(fan_in)) for weight and bias
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.weight, -bound, bound)
            if layer.bias is not None:
                nn.init.uniform_(layer.bias, -bound, bound)

        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=1.0)
        for block in self.blocks:
            # nn.MultiheadAttention: Xavier-uniform input projection, zero biases, nn.Linear's output weight.
            nn.init.xavier_uniform_(block.qkv.weight)
            nn.init.zeros_(block.qkv.bias)
            default_linear(block.out)
            nn.init.zeros_(block.out.bias)
            default_linear(block.fc)
            default_linear(block.proj)
        default_linear(self.head)
        for norm in [self.norm, *(n for block in self.blocks for n in (block.norm1, block.norm2))]:
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)

    def forward(self, idx: Tensor, every_position: bool = False) -> Tensor:
        """Answer logits (B, V) for token ids idx (B, T), read at the last position.

        `every_position` returns (B, T, V), the logits at each position of the causal model (for tests: its last
        column is what the default path computes more cheaply).
        """
        T = idx.shape[1]
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds the position table's {self.config.seq_len}")
        x = self.embed(idx) + self.pos.weight[:T]  # (B, T, C)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=not every_position and i == last)  # the last block: (B, 1, C)
        logits = self.head(self.norm(x))  # (B, T or 1, V)
        return logits if every_position else logits[:, -1]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------- optimisation


def make_modular_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float,
                           device: torch.device) -> torch.optim.Adam:
    """Adam with coupled L2 weight decay on every parameter, as the published code (not AdamW).

    Fused where torch has a fused kernel for the device: it honours `optimizer.found_inf`, so non-finite steps
    are skipped on the device without a host sync per step.
    """
    try:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay, foreach=True)


def make_modular_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 (the first step has lr 0, as in the published code), then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, start_mult=0.0, exponent=0.0))


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class ModularLoop(LoopState):
    """The trainer's loop counters (`tokens` and `loss_count` count equations here) plus this task's accuracy."""

    best_acc: float = math.nan
    final_acc: float = math.nan
    steps_to_target: int | None = None
    time_to_target: float | None = None
    correct: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))  # since the last eval

    def to(self, device: torch.device) -> ModularLoop:
        super().to(device)
        self.correct = self.correct.to(device)
        return self


def planned_steps(cfg: RunConfig, n_train: int) -> int:
    """The steps a run of `cfg` takes on `n_train` training equations: --max-steps, else --epochs of them."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)  # as EpochSampler cuts them
    return cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))


def train_modular(cfg: RunConfig, run_dir: Path | str, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train one run of the grokking benchmark into `run_dir`; return its summary (also written to summary.json).

    The run stops after `cfg.max_steps` steps (or `cfg.epochs` epochs of 10 steps when max_steps is None), or
    at the first evaluation whose validation accuracy reaches `cfg.target_acc`. It evaluates after every epoch
    and checkpoints every `cfg.checkpoint_every` epochs, or at the first evaluation after that much time
    (`30m`), and at the end (none when it is 0). With `resume`, it
    continues from the run's latest checkpoint if it has one. A run that fails or is interrupted (SIGINT,
    SIGTERM: after a checkpoint) still gets a summary with that status before the exception propagates.
    """
    if distributed.from_env().enabled:
        raise ConfigError("--task modular trains in one process: launch it without torchrun")
    run_dir = Path(run_dir)
    fresh_start()  # no compiled graph or recompile count of an earlier run in this process
    graphs_at_start = graphs_compiled()
    device = resolve_device(cfg.device)
    peak = PeakMemory.start(device)
    say = tqdm.write if progress else logger.info
    compile_model = device.type == "cuda" if cfg.compile is None else cfg.compile
    # float32 unless bf16 is asked for: the published runs are float32, and this model is too small for bf16
    # to buy much even on a GPU.
    precision = resolve_precision(device, "fp32" if cfg.precision == "auto" else cfg.precision)
    autocast = autocast_for(device, precision)

    data = {split: tuple(t.to(device) for t in xy) for split, xy in modular_dataset(P, seed=cfg.seed).items()}
    train_x, train_y = data["train"]
    valid_x, valid_y = data["valid"]
    n_train = len(train_x)

    torch.manual_seed(cfg.seed)
    model = ModularTransformer(ModularConfig(depth=cfg.depth, width=cfg.width)).to(device)
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]
    optimizer = make_modular_optimizer(params, cfg.lr, cfg.weight_decay, device)
    scheduler = make_modular_scheduler(optimizer, cfg.warmup_steps)
    grad_filter = build_filter(cfg, named_params, compile=compile_model)
    sampler = EpochSampler(n_train, cfg.batch_size, seed=cfg.seed, device=device)
    parts = Resumable(cfg, run_dir, model, optimizer, scheduler, grad_filter, sampler)
    loop, metrics, checkpoint = parts.start(resume, ModularLoop)
    loop.to(device)
    # Batches of 512, the epoch's remainder and the whole validation set: one graph for every batch size.
    compiled = FallbackCompiled(model, "the model", dynamic_dims=(0,)) if compile_model else model

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = planned_steps(cfg, n_train)
    per_checkpoint = cfg.checkpoint_cadence.epochs * n_train or math.inf  # in equations

    def forward(x: Tensor, y: Tensor) -> Tensor:
        logits = compiled(x)  # (B, V)
        loop.correct.add_((logits.argmax(-1) == y).sum())  # scored by the model before its step, as published
        return F.cross_entropy(logits.float(), y)

    writer = RunWriter(run_dir)
    record = config_record(cfg, device, model.num_params(), n_train, precision=precision)
    record["modular"] = {"p": P, "train_equations": n_train, "valid_equations": len(valid_x),
                         "steps_per_epoch": steps_per_epoch, "optimizer": "Adam (coupled L2 weight decay)",
                         "betas": list(ADAM_BETAS), "tokens": "training equations seen"}
    writer.begin(record, metrics)
    tracker = make_tracker(cfg, run_dir)
    say(f"{run_dir.name}: {model.num_params():,} parameters on {device}, {n_train:,} training equations, "
        f"up to {total_steps:,} steps of {cfg.batch_size} ({steps_per_epoch} per epoch)"
        f"{f', resumed at step {loop.step:,}' if checkpoint is not None else ''}")

    memory: dict[str, Any] = {}
    outcome = RunStatus(run_dir.name, say)
    bar = tqdm(total=total_steps, initial=min(loop.step, total_steps), unit="step", disable=not progress,
               dynamic_ncols=True, leave=True)

    @torch.no_grad()
    def log_point(result: StepResult) -> bool:
        """Evaluate, write a metrics row; True when the target accuracy is reached."""
        with autocast():
            logits = compiled(valid_x)  # the whole validation set in one pass: (n_valid, V)
        ratio = result.ema_ratio if result.ema_ratio is not None else torch.full((), math.nan)
        # One host sync for everything the row needs.
        val_loss, val_acc, train_loss, train_acc, grad_norm, ratio = torch.stack([
            F.cross_entropy(logits.float(), valid_y), (logits.argmax(-1) == valid_y).float().mean(),
            loop.loss_sum / max(loop.loss_count, 1), loop.correct.float() / max(loop.loss_count, 1),
            result.grad_norm.float(), ratio.float().to(device),
        ]).tolist()
        loop.final_acc = val_acc
        loop.best_acc = val_acc if math.isnan(loop.best_acc) else max(loop.best_acc, val_acc)
        row = {**loop.metrics_row(n_train, train_loss, val_loss, scheduler.get_last_lr()[0], grad_norm, ratio),
               "val_acc": val_acc, "train_acc": train_acc}
        metrics.append(row)
        writer.append_metrics(row)
        tracker.log(row)
        loop.loss_sum.zero_()
        loop.correct.zero_()
        loop.loss_count = 0
        bar.set_postfix_str(f"epoch {row['epoch']:.0f} | loss {train_loss:.3f} | val acc {val_acc:.3f}",
                            refresh=False)
        if not math.isfinite(val_loss):
            raise Diverged(f"validation loss is not finite at step {loop.step}")
        reached = cfg.target_acc is not None and val_acc >= cfg.target_acc
        if reached and loop.steps_to_target is None:
            loop.steps_to_target, loop.time_to_target = loop.step, loop.train_time
        return reached

    wall_start = time.perf_counter() - loop.wall_time
    try:
        with outcome, StopSignals() as stop:
            lap = Lap.begin(loop)
            while loop.step < total_steps:
                index = sampler.next()
                x, y = train_x[index], train_y[index]
                micro = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
                before = loop.tokens
                loop.tokens += len(index)
                loop.step += 1
                evaluate_now = loop.step % steps_per_epoch == 0 or loop.step == total_steps
                checkpoint_now = eval_due(before, loop.tokens, per_checkpoint)
                result = optimizer_step(forward, micro, params, optimizer, scheduler, grad_filter, cfg.clip,
                                        autocast, measure=evaluate_now)
                loop.loss_sum += result.loss * len(index)
                loop.loss_count += len(index)
                loop.bad_run = (loop.bad_run + result.found_inf) * result.found_inf
                loop.diverged_at = torch.where((loop.diverged_at < 0) & (loop.bad_run > cfg.max_bad_steps),
                                               loop.step, loop.diverged_at)
                bar.update(1)

                stopping = stop.requested is not None
                if evaluate_now or checkpoint_now or stopping:  # the only host syncs of the loop
                    synchronize(device)
                    loop.add_lap(lap)
                    if loop.diverged_at.item() >= 0:
                        raise Diverged(f"more than {cfg.max_bad_steps} consecutive steps with non-finite "
                                       f"gradients, from step {int(loop.diverged_at.item()) - cfg.max_bad_steps}")
                    if not memory:
                        memory = memory_breakdown(model, optimizer, grad_filter, peak)
                        say(format_memory(memory))
                    reached = evaluate_now and log_point(result)
                    loop.wall_time = time.perf_counter() - wall_start
                    if reached:
                        say(f"{run_dir.name}: validation accuracy {loop.final_acc:.3f} >= {cfg.target_acc} "
                            f"at step {loop.step}")
                        break
                    if checkpoint_now or stopping or parts.time_due():
                        parts.save(loop, metrics, "signal" if stopping else "periodic", say)
                    if stopping:
                        raise Interrupted(f"stopped by {stop.requested} at step {loop.step}")
                    lap = Lap.begin(loop)
            # So that a completed run can be extended with a larger --max-steps.
            parts.save(loop, metrics, "final", say)
    finally:
        bar.close()
        memory = final_memory(memory, model, optimizer, grad_filter, peak)
        summary = {
            **run_summary(outcome.status, outcome.error, loop, n_train, time.perf_counter() - wall_start, memory,
                          compile_record(compile_model, [compiled.error if compile_model else None,
                                                         grad_filter.compile_error], graphs_at_start)),
            "best_val_acc": loop.best_acc,
            "final_val_acc": loop.final_acc,
            "target_acc": cfg.target_acc,
            "steps_to_target": loop.steps_to_target,
            "time_to_target_s": loop.time_to_target,
        }
        writer.write_summary(summary)
        tracker.finish(summary)
    return summary
