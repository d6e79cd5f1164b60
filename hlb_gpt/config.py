"""Every setting of one run as a typed dataclass, with presets and validation.

`RunConfig` is what `train()` takes and what `config.json` records. Each field also describes its command-line flag
(`setting`): the CLI builds its options from the fields. Fields left as `None` are filled from the preset when the
config is built, so a config is always fully resolved. Validation happens in `__post_init__`,
before any work, and every message names the flag that fixes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hlb_gpt import components
from hlb_gpt.components.tasks import Preset

DATASETS = ("wikitext-103", "wikitext-2", "mini")
TOKENIZERS = ("gpt2", "bytes")
GATES = ("none", "relu", "sigmoid")
FILTER_DTYPES = ("float32", "bfloat16", "param")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")
ATTENTIONS = ("auto", "sdpa", "flex")
LORA_TARGETS = ("in", "out", "gate", "head")  # see `finetune`: block input, output, gate matrices; the head
TRAIN_ONLY = ("embed", "in", "out", "gate", "position", "norms", "head")
MUON_MATRICES = ("in", "out", "gate")  # the --train-only components whose matrices Muon trains (see `optim`)


class ConfigError(ValueError):
    """A setting or combination of settings the user must change; the message names the flag."""


MINI_HAS_NO_TEST = ("--eval-test: --dataset mini trains on WikiText-2's test split, so its test loss would be "
                    "measured on training data; use --dataset wikitext-2 or a --data-dir with wiki.test.raw")


# `--checkpoint-every 30m`: seconds per unit of a time cadence.
TIME_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# Without --checkpoint-every, epoch checkpoints are at least this many seconds apart: an epoch of `mini` is 4.4
# steps of the hlb preset, whose checkpoint (~0.9 GB, fsynced) would otherwise be written every 4-5 steps.
DEFAULT_CHECKPOINT_GAP = 600.0


@dataclass(frozen=True)
class Cadence:
    """How often a run checkpoints: every `epochs` of training data or every `seconds` of wall time since the
    last checkpoint (one of them is 0); both 0 means never. False when it never checkpoints."""

    epochs: float = 0.0
    seconds: float = 0.0
    min_seconds: float = 0.0
    """The least wall time between two epoch checkpoints (the default cadence's `DEFAULT_CHECKPOINT_GAP`)."""

    def __bool__(self) -> bool:
        return self.epochs > 0 or self.seconds > 0

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "min_seconds" or v}


def parse_cadence(value: float | str) -> Cadence:
    """`--checkpoint-every`: a number is epochs (``2``, ``0.5``; 0 for none), a number followed by s, m or h is
    time (``90s``, ``30m``, ``2h``). Time suits runs whose epoch takes seconds; an epoch count, runs whose
    checkpoints should fall at the same point whatever the hardware."""
    text = str(value).strip().lower()
    unit = text[-1:] if text[-1:] in TIME_UNITS else ""
    try:
        number = float(text[:-1] if unit else text)
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not (number >= 0 and math.isfinite(number)):
        raise ConfigError(f"--checkpoint-every must be a number of epochs or minutes like 30m (also 90s, 2h), "
                          f"0 for none (got {value!r})")
    return Cadence(seconds=number * TIME_UNITS[unit]) if unit else Cadence(epochs=number)


# --preset's choices: the presets every task brings.
PRESETS: dict[str, Preset] = {name: p for task in components.TASKS.values() for name, p in task.presets.items()}


def setting(default: Any, help: str, *, note: str | None = None,
            choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
            grid: bool = False, negatable: bool = False, folder: bool = False, parse: type | None = None,
            flag_name: str | None = None) -> Any:
    """A `RunConfig` field together with what its command-line flag needs, so a setting is described once.

    `help` is the flag's help text; `note` the default in words when it depends on other settings (shown as
    ``[note]``); `choices` the values allowed (checked here and offered by the flag), or a function giving them
    when they are the registered components (`hlb_gpt.components`); `grid` marks a setting whose
    flag takes a comma-separated list, one run per value; `negatable` gives a boolean its --no- form; `folder` makes
    the flag a directory path; `parse` is the flag's value type when the field's annotation names several;
    `flag_name` the flag when it cannot be the field's name (which a run's record already uses).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "note": note, "choices": choices, "grid": grid, "negatable": negatable, "folder": folder,
        "parse": parse, "flag": flag_name,
    })


@dataclass
class RunConfig:
    """One training run. Every field is also a flag of the same name (underscores become dashes) and an
    environment variable HLB_GPT_<FIELD>; `setting` holds the flag's help."""

    task: str = setting(components.tasks.DEFAULT, components.described(components.TASKS),
                        choices=lambda: tuple(components.TASKS))
    # data
    dataset: str = setting("wikitext-103", "Training corpus. `mini` is bundled (WikiText-2 test as train, valid as "
                           "valid) and works offline.", choices=DATASETS, grid=True)
    data_dir: str | None = setting(None, "Folder with wiki.train.raw and wiki.valid.raw (and wiki.test.raw for "
                                   "--eval-test), used instead of the hub (offline clusters).", folder=True)
    data_cache: str = setting("data", "Where tokenized splits are cached.", folder=True)
    tokenizer: str = setting("gpt2", "gpt2: GPT-2 BPE (bundled ranks, no download); bytes: UTF-8 bytes, vocab 256.",
                             choices=TOKENIZERS, grid=True)
    # config.json records the tokens a run trained on as `train_tokens`: the setting that cuts them has another name.
    train_tokens_limit: int | None = setting(None, "Train on the first N tokens of the training split (a data-size "
                                             "ablation); an epoch is a pass over them.", note="the whole split",
                                             grid=True, flag_name="--train-tokens")
    # model and batch (None: the preset's value; the preset defaults to the task's)
    preset: str | None = setting(None, "hlb: hlb-gpt's 46M model (8 x 384); tiny: laptop scale (4 x 128, seq 256, "
                                 "batch 16); modular: the grokking benchmark's model.",
                                 note="hlb, or modular with --task modular", choices=tuple(PRESETS))
    depth: int | None = setting(None, "Number of blocks.", note="preset", grid=True)
    width: int | None = setting(None, "Residual width, divisible by 8.", note="preset", grid=True)
    gate: str = setting("none", "Gate each block's output: y * act(W x).", choices=GATES, grid=True)
    seq_len: int | None = setting(None, "Sequence length.", note="preset", grid=True)
    batch_size: int | None = setting(None, "Sequences per optimizer step at full length.", note="preset", grid=True)
    grad_accum: int = setting(1, "Micro-batches per optimizer step (divides --batch-size).")
    seq_warmup: bool = setting(True, "hlb-gpt's schedule: sequences start at 32 tokens and double every 80 steps, "
                               "same tokens per step.", negatable=True)
    # optimisation
    optimizer: str = setting(components.optimizers.DEFAULT, components.described(components.OPTIMIZERS),
                             choices=lambda: tuple(components.OPTIMIZERS), grid=True)
    lr: float | None = setting(None, "Base learning rate of the block matrices.", note="preset", grid=True)
    weight_decay: float | None = setting(None, "Weight decay of the block matrices, constant (not loss-dependent as "
                                         "in hlb-gpt).", note="0.01; modular 0", grid=True)
    warmup_steps: int | None = setting(None, "Linear learning-rate warmup.", note="100; modular 10", grid=True)
    clip: float | None = setting(None, "Clip the global gradient norm after the filter.", note="off", grid=True)
    grok_kappa: float = setting(0.1, "GrokAdamW: alpha_t = alpha * exp(-kappa * grokking signal).", grid=True)
    grok_gamma: float = setting(0.1, "GrokAdamW: layer-wise beta1_l = beta1 * (1 - gamma)^l.", grid=True)
    # --optimizer muon only; other optimizers record None
    muon_lr: float | None = setting(None, "Muon: lr of the block matrices, on the --lr schedule.",
                                    note=f"{components.optimizers.MUON_LR}", grid=True)
    muon_momentum: float | None = setting(None, "Muon: Nesterov momentum.",
                                          note=f"{components.optimizers.MUON_MOMENTUM}", grid=True)
    # Grokfast
    grokfast: bool = setting(False, "Filter gradients with Grokfast (the filtered configurations).")
    filter: str = setting(components.filters.DEFAULT, components.described(components.FILTERS),
                          choices=lambda: tuple(components.FILTERS), grid=True)
    alpha: float = setting(0.98, "EMA momentum in [0, 1).", grid=True)
    gain: float = setting(2.0, "Amplification (lambda) >= 0.", grid=True)
    window: int = setting(100, "MA window in steps.", grid=True)
    filter_dtype: str = setting("float32", "Dtype of the filter state (param: the parameter's dtype).",
                                choices=FILTER_DTYPES, grid=True)
    # schedule of the run
    epochs: float = setting(1.0, "Training length in epochs (a float).")
    evals_per_epoch: int = setting(1, "Evaluations per epoch (one more at the end).")
    eval_at_start: bool = setting(True, "Evaluate once before the first step, so curves start at the initial loss.",
                                  negatable=True)
    eval_tokens: int | None = setting(None, "Validation tokens per evaluation, from the start of the split; 0 = all.",
                                      note="preset")
    eval_test: bool = setting(False, "At the end of a completed run, evaluate the whole test split once "
                              "(summary.json's test_loss); not with --dataset mini, whose training text is "
                              "WikiText-2's test split.")
    seed: int = setting(0, "Seed(s); shared by all configurations.", grid=True)
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.", note="no limit")
    target_acc: float | None = setting(None, "--task modular: stop once validation accuracy reaches this (e.g. 0.95).")
    target_loss: float | None = setting(None, "--task lm: stop at the first evaluation whose validation loss is at or "
                                        "below this (e.g. 3.5).")
    max_bad_steps: int = setting(10, "Consecutive non-finite steps before a run counts as diverged.")
    checkpoint_every: float | str | None = setting(  # epochs, or a time like "30m" (see `parse_cadence`)
        None, "Checkpoint interval: epochs (a number; 0: none) or wall time since the last checkpoint (30m, also 90s, "
        "2h); interrupted runs resume from the latest.",
        note="1, at least 10 minutes apart; modular 100, an epoch there being 10 steps",
        parse=str)
    keep_checkpoints: int = setting(2, "Checkpoints kept per run.")
    # fine-tuning (see `finetune`): start from a run's weights; train adapters or some components only
    init_from: str | None = setting(None, "Start from this run's final (or latest) checkpoint. Its tokenizer, depth, "
                                    "width and gate are taken (others are refused), and its preset and --seq-len "
                                    "unless given.", folder=True)
    lora_rank: int = setting(0, "With --init-from: freeze the weights and train rank-r adapters W + (alpha/r) B A on "
                             "--lora-targets; 0: no adapters.", grid=True)
    lora_alpha: float = setting(16.0, "LoRA scale numerator: the adapters are scaled by alpha / rank.", grid=True)
    lora_targets: str = setting("in,out", "Matrices that get adapters, a comma list of in (each block's input "
                                "projection: queries, keys, GeGLU), out (its output projection), gate (its gate "
                                "matrix), head.")
    train_only: str | None = setting(None, "With --init-from: train only these components, a comma list of embed, "
                                     "in, out, gate, position (attention range), norms, head; with --lora-rank, "
                                     "these besides the adapters.", parse=str)
    # hardware
    device: str = setting("auto", "auto: cuda, then mps, then cpu.", choices=DEVICES)
    precision: str = setting("auto", "auto: bf16 autocast on CUDA GPUs with native bf16 (Ampere or newer), fp32 "
                             "elsewhere.", choices=PRECISIONS)
    compile: bool | None = setting(None, "torch.compile the model, the filter and GrokAdamW's step.",
                                   note="on for CUDA", negatable=True)
    attention: str = setting("auto", "Attention kernel. sdpa: PyTorch's SDPA with the distance bias as a mask (any "
                             "device); flex: FlexAttention, causal block mask, bias as a score_mod (CUDA); auto: flex "
                             "on CUDA under --compile, else sdpa.", choices=ATTENTIONS)
    # logging
    wandb: bool = setting(False, "Also log to Weights & Biases (WANDB_MODE=offline works).")
    wandb_project: str = setting("hlb-gpt", "wandb project.")
    profile: int | None = setting(None, "Write a torch.profiler Chrome trace of the 3 training steps from this one "
                                  "(N, N+1, N+2; the first step is 1) to the run folder's profile.json.", note="off")

    def __post_init__(self) -> None:
        _choice("--task", self.task, tuple(components.TASKS))  # before the preset, which defaults to the task's
        if self.preset is None:
            self.preset = components.TASKS[self.task].preset
        for f in dataclasses.fields(self):
            if f.metadata.get("choices"):
                _choice(flag(f.name), getattr(self, f.name), choices_of(f))
        preset = PRESETS[self.preset]
        # checkpoint_every stays None unless given: the default cadence is the preset's, with a least gap.
        for name in ("depth", "width", "seq_len", "batch_size", "lr", "eval_tokens", "weight_decay", "warmup_steps"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        for name, value in components.optimizer_of(vars(self)).defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._validate()

    def _validate(self) -> None:
        _positive("--depth", self.depth)
        _positive("--width", self.width)
        if self.width % 8:
            raise ConfigError(f"--width must be divisible by 8, the query/key split (got {self.width})")
        _positive("--seq-len", self.seq_len)
        _positive("--batch-size", self.batch_size)
        _positive("--grad-accum", self.grad_accum)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--batch-size ({self.batch_size}) must be divisible by --grad-accum ({self.grad_accum})"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number (got {self.lr})")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0 (got {self.warmup_steps})")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"--clip must be > 0 (got {self.clip})")
        if not (0 <= self.alpha < 1):
            raise ConfigError(f"--alpha must be in [0, 1) for the Grokfast filter (got {self.alpha})")
        if not self.gain >= 0:
            raise ConfigError(f"--gain must be >= 0 (got {self.gain})")
        _positive("--window", self.window)
        self._validate_train_tokens()
        components.TASKS[self.task].check(self)
        optimizer = components.optimizer_of(vars(self))
        if self.grokfast and optimizer.filters:
            raise ConfigError(f"--optimizer {self.optimizer} filters gradients itself; drop --grokfast "
                              "(its --alpha and --gain set its filter)")
        if not self.grok_kappa >= 0:
            raise ConfigError(f"--grok-kappa must be >= 0 (got {self.grok_kappa})")
        if not (0 <= self.grok_gamma < 1):
            raise ConfigError(f"--grok-gamma must be in [0, 1) (got {self.grok_gamma})")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"--epochs must be > 0 (got {self.epochs})")
        _positive("--evals-per-epoch", self.evals_per_epoch)
        if self.eval_tokens < 0:
            raise ConfigError(f"--eval-tokens must be >= 0, 0 meaning the whole validation split (got {self.eval_tokens})")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0 (got {self.seed})")
        _positive("--max-bad-steps", self.max_bad_steps)
        # Recorded as given ("30m"), but epochs as a number whether the flag's text or a float said them.
        if self.checkpoint_every is not None:
            cadence = parse_cadence(self.checkpoint_every)
            self.checkpoint_every = str(self.checkpoint_every).strip().lower() if cadence.seconds else cadence.epochs
        _positive("--keep-checkpoints", self.keep_checkpoints)
        if self.max_steps is not None:
            _positive("--max-steps", self.max_steps)
        if self.profile is not None and not self.profile >= 1:
            raise ConfigError(f"--profile must be a step >= 1 (got {self.profile})")
        if self.target_acc is not None and not (0 < self.target_acc <= 1):
            raise ConfigError(f"--target-acc must be in (0, 1] (got {self.target_acc})")
        if self.target_loss is not None and not (self.target_loss > 0 and math.isfinite(self.target_loss)):
            raise ConfigError(f"--target-loss must be a positive number (got {self.target_loss})")
        target = components.TASKS[self.task].target  # the one stopping target its task evaluates
        for other in {task.target for task in components.TASKS.values() if task.target} - {target}:
            if getattr(self, other) is not None:
                raise ConfigError(f"{flag(other)} is not a target of --task {self.task}, which stops at its "
                                  f"{flag(target)}: use that")
        self._validate_finetune()
        self._validate_components(optimizer)
        if self.data_dir is not None:
            for split in ("wiki.train.raw", "wiki.valid.raw"):
                if not (Path(self.data_dir) / split).is_file():
                    raise ConfigError(f"--data-dir {self.data_dir} has no {split}")
                if (Path(self.data_dir) / split).stat().st_size == 0:
                    raise ConfigError(f"--data-dir {self.data_dir}: {split} is empty")
        if self.eval_test:
            self._validate_eval_test()

    def _validate_eval_test(self) -> None:
        if not components.TASKS[self.task].holds_text:
            raise ConfigError(f"--eval-test: --task {self.task} has no test split; drop --eval-test")
        if self.data_dir is None and self.dataset == "mini":
            raise ConfigError(MINI_HAS_NO_TEST)
        if self.data_dir is not None:
            test = Path(self.data_dir) / "wiki.test.raw"
            if not test.is_file():
                raise ConfigError(f"--eval-test: --data-dir {self.data_dir} has no wiki.test.raw (the test split); "
                                  "add it or drop --eval-test")
            if test.stat().st_size == 0:
                raise ConfigError(f"--eval-test: --data-dir {self.data_dir}: wiki.test.raw is empty")

    def _validate_train_tokens(self) -> None:
        """At least one step's batch: an epoch shorter than a step would end and begin inside one. The upper bound,
        the split's size, is known once the data is (`data.first_tokens`)."""
        limit = self.train_tokens_limit
        if limit is None:
            return
        if not components.TASKS[self.task].holds_text:
            raise ConfigError(f"--task {self.task} trains on its table of equations, not on text; drop --train-tokens")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"--train-tokens must be an integer >= 1, the training tokens used (got {limit!r})")
        batch = self.batch_size * self.seq_len
        if limit < batch:
            raise ConfigError(f"--train-tokens {limit} is less than one step's batch, --batch-size x --seq-len = "
                              f"{self.batch_size} x {self.seq_len} = {batch} tokens")
        if limit < self.seq_len + 1:  # a batch of one sequence still needs the token after it
            raise ConfigError(f"--train-tokens {limit} is less than one sequence and the token after it, --seq-len + 1"
                              f" = {self.seq_len + 1} tokens")

    def _validate_components(self, optimizer: Any) -> None:
        """Each optimizer's own settings (unset, None, for the others) and its refusals; the filter's."""
        for other in components.OPTIMIZERS.values():
            given = [flag(name) for name in other.defaults
                     if name not in optimizer.defaults and getattr(self, name) is not None]
            if given:
                raise ConfigError(f"{', '.join(given)}: for --optimizer {other.name} only "
                                  f"(got --optimizer {self.optimizer})")
        optimizer.check(self)
        if self.grokfast:
            components.filter_of(vars(self)).check(self)

    def _validate_finetune(self) -> None:
        """Lists are recorded in one canonical order, so `out,in` and `in,out` are one configuration."""
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be an integer >= 0, 0 for no adapters (got {self.lora_rank!r})")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"--lora-alpha must be a positive number (got {self.lora_alpha})")
        self.lora_targets = _names("--lora-targets", self.lora_targets, LORA_TARGETS)
        if self.train_only is not None:
            if {"attn", "mlp"} & set(_split(self.train_only)):
                raise ConfigError("--train-only: attention and MLP share each block's in and out matrices; choose "
                                  f"among {', '.join(TRAIN_ONLY)} (the attention's own parameter is position)")
            self.train_only = _names("--train-only", self.train_only, TRAIN_ONLY)
        fine_tunes = self.lora_rank > 0 or self.train_only is not None
        if not components.TASKS[self.task].fine_tunes and (fine_tunes or self.init_from is not None):
            raise ConfigError(f"--task {self.task} trains its own model from scratch; drop --init-from, --lora-rank "
                              "and --train-only")
        if self.lora_rank > 0 and self.gate == "none" and "gate" in _split(self.lora_targets):
            raise ConfigError("--lora-targets gate: the model has no gate (--gate none); drop gate from the targets")
        if self.train_only is not None and self.gate == "none" and "gate" in _split(self.train_only):
            raise ConfigError("--train-only gate: the model has no gate (--gate none)")
        both = set(_split(self.lora_targets)) & set(_split(self.train_only)) if self.lora_rank > 0 else set()
        if both:
            raise ConfigError(f"--train-only {','.join(sorted(both))} would train the matrices --lora-targets adapts; "
                              "choose one of them")

    @property
    def checkpoint_cadence(self) -> Cadence:
        """`checkpoint_every` parsed: epochs or seconds between checkpoints. Not given: the preset's epochs, at least
        `DEFAULT_CHECKPOINT_GAP` seconds apart."""
        if self.checkpoint_every is None:
            return Cadence(epochs=PRESETS[self.preset].checkpoint_every, min_seconds=DEFAULT_CHECKPOINT_GAP)
        return parse_cadence(self.checkpoint_every)

    def differences(self, other: RunConfig, ignore: frozenset[str] = frozenset()) -> list[str]:
        """`--flag: mine vs theirs` for every setting that differs, except those in `ignore`."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{flag(k)}: {mine[k]!r} vs {theirs[k]!r}"
                for k in mine if k not in ignore and mine[k] != theirs[k]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with `changes`; another optimizer drops the settings the old one alone owned (Muon's), so they
        are unset again unless the new one owns them too."""
        if changes.get("optimizer", self.optimizer) != self.optimizer:
            owned = components.optimizer_of(changes).defaults
            changes = {**{key: None for key in components.owned_settings() if key not in owned}, **changes}
        return dataclasses.replace(self, **changes)

    @property
    def kind(self) -> str:
        """What the run is: `baseline` (no filter), its filter's name, or that of an optimizer that filters."""
        return self.kind_of(vars(self))

    @staticmethod
    def kind_of(settings: Mapping[str, Any]) -> str:
        """`kind` of any settings, a RunConfig's or a recorded config.json's (where a missing key has its
        default): `compare` and `plots` read it from records without building a config."""
        return components.kind_of(settings)


# The settings whose flag takes a list: one run per value (per combination, see `sweep.expand_grid`).
GRID_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("grid"))

# Settings that do not change the experiment: how a run is checkpointed, logged and profiled, where its files go,
# whether its end also reads the test split (which no number of training reads: a run extended later evaluates it
# at its new end). `compare` never separates runs by them, and a resumed run may change them.
BOOKKEEPING = frozenset({"checkpoint_every", "keep_checkpoints", "wandb", "wandb_project", "data_cache",
                         "eval_test", "profile"})
# A resumed run may also change how long it runs (the length and its stopping rules), the device and compile, and
# where its data lives (paths differ across machines; the data itself is checked by its sha256). Every one of
# these but the bookkeeping separates configurations in `compare`.
MAY_CHANGE_ON_RESUME = BOOKKEEPING | frozenset({
    "epochs", "max_steps", "target_acc", "target_loss", "max_bad_steps", "device", "compile", "data_dir",
})


def check_resumable(cfg: RunConfig, saved: dict[str, Any], where: Path | str) -> None:
    """Refuse to continue a run under settings other than those it was trained with."""
    diffs = cfg.differences(RunConfig.from_dict(saved), ignore=MAY_CHANGE_ON_RESUME)
    if diffs:
        raise ConfigError(f"{where} was trained with other settings (command vs run): {'; '.join(diffs)}")


def choices_of(field: dataclasses.Field) -> tuple[str, ...]:
    """The values a setting with `choices` allows, now (components registered since import included)."""
    choices = field.metadata["choices"]
    return tuple(choices()) if callable(choices) else choices


def _default(name: str) -> Any:
    return RunConfig.__dataclass_fields__[name].default


def flag(name: str) -> str:
    """The command-line flag of a `RunConfig` field: `filter_dtype` -> `--filter-dtype` (`train_tokens_limit`,
    whose flag is named in its `setting`: `--train-tokens`)."""
    field = RunConfig.__dataclass_fields__.get(name)
    return (field.metadata.get("flag") if field is not None else None) or "--" + name.replace("_", "-")


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)} (got {value!r})")


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _names(flag: str, text: str, choices: tuple[str, ...]) -> str:
    """A comma list of choices, checked, without repeats and in the order of `choices`."""
    names = _split(text)
    if not names:
        raise ConfigError(f"{flag} must name at least one of {', '.join(choices)}")
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ConfigError(f"{flag}: unknown {', '.join(unknown)}; choose among {', '.join(choices)}")
    return ",".join(c for c in choices if c in names)


def _positive(flag: str, value: int) -> None:
    if not value >= 1:
        raise ConfigError(f"{flag} must be >= 1 (got {value})")
