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

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hlb_gpt import distributed
from hlb_gpt.config import RunConfig
from hlb_gpt.device import resolve_precision
from hlb_gpt.optim import lr_lambda
from hlb_gpt.tasks import Batch

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


# ----------------------------------------------------------------------------------------------- the task


def planned_steps(cfg: RunConfig, n_train: int) -> int:
    """The steps a run of `cfg` takes on `n_train` training equations: --max-steps, else --epochs of them."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)  # as EpochSampler cuts them
    return cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))


@functools.lru_cache(maxsize=None)
def _count_params(depth: int, width: int) -> int:
    with torch.device("meta"):
        return ModularTransformer(ModularConfig(depth=depth, width=width)).num_params()


def _trained(row: dict[str, Any]) -> bool:
    """Whether the evaluation came after training began: the step-0 one (the untrained model) reaches no target
    and is no best or final accuracy."""
    return row["step"] > 0


class ModularArithmetic:
    """The grokking benchmark: the `Task` the trainer runs for --task modular.

    The run stops after `cfg.max_steps` steps (or `cfg.epochs` epochs of 10 steps when max_steps is None), or
    at the first evaluation whose validation accuracy reaches `cfg.target_acc`. With the default
    --evals-per-epoch 1 it evaluates after every epoch.
    """

    dynamic_dims = (0,)  # batches of 512, the epoch's remainder and the whole validation set: one graph
    static_sizes: dict[int, int] = {}
    data_source = "generated"
    attention = None  # the model's own attention over 4 tokens: --attention does not apply
    text_sha256 = None

    @staticmethod
    def planned_steps(cfg: RunConfig, n_train: int) -> int:
        return planned_steps(cfg, n_train)

    @staticmethod
    def count_params(cfg: RunConfig) -> int:
        return _count_params(cfg.depth, cfg.width)

    @staticmethod
    def vocab_size(cfg: RunConfig) -> int:
        return ModularConfig.vocab_size

    @staticmethod
    def check(cfg: RunConfig, device: torch.device, compile: bool) -> None:
        pass

    def __init__(self, cfg: RunConfig, device: torch.device, ddp: distributed.Dist, compile: bool) -> None:
        self.cfg, self.device = cfg, device
        # float32 unless bf16 is asked for: the published runs are float32, and this model is too small for bf16
        # to buy much even on a GPU.
        self.precision = resolve_precision(device, "fp32" if cfg.precision == "auto" else cfg.precision)
        data = {split: tuple(t.to(device) for t in xy) for split, xy in modular_dataset(P, seed=cfg.seed).items()}
        self.train_x, self.train_y = data["train"]
        self.valid_x, self.valid_y = data["valid"]
        self.n_train = len(self.train_x)
        self.sampler = EpochSampler(self.n_train, cfg.batch_size, seed=cfg.seed, device=device)
        # Training accuracy since the last evaluation, on this rank's share of the batches.
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def build_model(self) -> nn.Module:
        return ModularTransformer(ModularConfig(depth=self.cfg.depth, width=self.cfg.width)).to(self.device)

    def begin(self, model: nn.Module, run_dir: Any, resumed: bool) -> None:
        pass  # the model starts from its initialisation or its checkpoint

    def build_optimizer(self, named_params: list[tuple[str, nn.Parameter]]):
        optimizer = make_modular_optimizer([p for _, p in named_params], self.cfg.lr, self.cfg.weight_decay,
                                           self.device)
        return optimizer, make_modular_scheduler(optimizer, self.cfg.warmup_steps)

    def describe(self, total_steps: int) -> str:
        return (f"{self.n_train:,} training equations, up to {total_steps:,} steps of {self.cfg.batch_size} "
                f"({self.sampler.steps_per_epoch} per epoch)")

    def record(self) -> dict[str, Any]:
        return {"modular": {"p": P, "train_equations": self.n_train, "valid_equations": len(self.valid_x),
                            "steps_per_epoch": self.sampler.steps_per_epoch,
                            "optimizer": "Adam (coupled L2 weight decay)", "betas": list(ADAM_BETAS),
                            "tokens": "training equations seen"}}

    def batch(self, step: int) -> Batch:
        index = self.sampler.next()
        # The training loss of a row is a mean over equations: the epoch's short last batch weighs less.
        return Batch(self.train_x[index], self.train_y[index], items=len(index), weight=len(index))

    def loss(self, model: Callable[..., Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)  # (B, V)
        self.correct.add_((logits.argmax(-1) == y).sum())  # scored by the model before its step, as published
        self.seen += len(y)
        return F.cross_entropy(logits.float(), y)

    @torch.no_grad()
    def evaluate(self, model: Callable[..., Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
        with autocast():
            logits = model(self.valid_x)  # the whole validation set in one pass: (n_valid, V)
        val_loss, val_acc, train_acc = torch.stack([  # one host sync for all three
            F.cross_entropy(logits.float(), self.valid_y), (logits.argmax(-1) == self.valid_y).float().mean(),
            self.correct.float() / max(self.seen, 1),
        ]).tolist()
        self.correct.zero_()
        self.seen = 0
        return {"val_loss": val_loss, "val_acc": val_acc, "train_acc": train_acc}

    def should_stop(self, row: dict[str, Any]) -> str | None:
        if not self._reached(row):
            return None
        return f"validation accuracy {row['val_acc']:.3f} >= {self.cfg.target_acc}"

    def _reached(self, row: dict[str, Any]) -> bool:
        return (self.cfg.target_acc is not None and _trained(row)
                and row.get("val_acc", math.nan) >= self.cfg.target_acc)

    def evaluate_end(self, model: Callable[..., Tensor],
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Any]:
        return {}  # no test split: the validation equations are the held-out half of the table

    def summary(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        best = final = math.nan
        for row in filter(_trained, metrics):
            if "val_acc" in row:
                final = row["val_acc"]
                best = final if math.isnan(best) else max(best, final)
        first = next((row for row in metrics if self._reached(row)), None)
        return {"best_val_acc": best, "final_val_acc": final, "target_acc": self.cfg.target_acc,
                "steps_to_target": first["step"] if first else None,
                "time_to_target_s": first["time_s"] if first else None}

    def state_dict(self) -> dict[str, Any]:
        return {"correct": self.correct.detach().cpu().clone(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.correct = state["correct"].to(self.device)
        # Checkpoints written before the task counted its own equations: the loop's count was the same number.
        self.seen = state.get("seen", state["loss_count"])
