"""Fine-tuning a trained run: start from its weights, then train low-rank adapters (LoRA) or a few components.

`prepare_model` applies `--init-from`, `--train-only` and `--lora-rank` to a freshly built model, before the
optimizer and the filter see its parameters. See docs/DESIGN.md, section 12.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from hlb_gpt.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from hlb_gpt.config import LORA_TARGETS, TRAIN_ONLY, ConfigError, RunConfig

logger = logging.getLogger(__name__)

# LoRA targets (`config.LORA_TARGETS`), the matrices of `model.GPT`: each block's input projection `in`
# (`expand`: queries, keys and the GeGLU, whose last `width` channels are the attention values), its output
# projection `out` (`project`, of the GeGLU's local part and the attention output together), its output `gate`
# (with --gate relu or sigmoid), and the `head`.
TARGETS = LORA_TARGETS
# --train-only components (`config.TRAIN_ONLY`): the targets above, the token embedding `embed`, every LayerNorm
# `norms`, and each block's attention range `position`. Attention and MLP share each block's `in` and `out`
# matrices, so they cannot be trained apart by freezing parameters; the attention's own parameter is `position`.
COMPONENTS = TRAIN_ONLY
# What the shapes of the weights depend on: an --init-from run must agree on all of them.
ARCHITECTURE = ("tokenizer", "depth", "width", "gate")
# Taken from an --init-from run when the command does not give them. No weight depends on the sequence length
# (positions enter only through the distance bias), so a fine-tune may change it.
INHERITED = (*ARCHITECTURE, "preset", "seq_len")

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrap the model under these
_ADAPTED = re.compile(r"^(?P<module>.*)\.parametrizations\.(?P<name>[^.]+)\.original$")


class LoRA(nn.Module):
    """The parametrization W -> W + (alpha / rank) B A of an (out x in) matrix, with adapters A (rank x in) and
    B (out x rank). A is drawn as `nn.Linear` draws its weight (Kaiming uniform) and B is zero, so the adapted
    matrix starts bit-identical to W; B's gradient, (dL/dW) A^T, is nonzero from the first step, and A's follows
    once B is."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def parse_names(text: str | None) -> list[str]:
    """`"in, out"` -> ["in", "out"]; None or empty -> []."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------- freezing


def components(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of each --train-only component (`COMPONENTS`) of a `model.GPT` (not yet adapted)."""
    blocks = list(model.blocks)
    return {
        "embed": [model.embed.weight],
        "in": [b.expand for b in blocks],
        "out": [b.project for b in blocks],
        "gate": [b.gate for b in blocks if b.gate is not None],
        "position": [b.position_bias for b in blocks],
        "norms": [model.norm.weight, *(b.norm.weight for b in blocks)],
        "head": [model.head.weight],
    }


def freeze_except(model: nn.Module, train_only: list[str]) -> None:
    """Freeze every parameter of `model` but those of the components in `train_only` (`COMPONENTS`)."""
    found = components(model)
    unknown = [c for c in train_only if c not in found]
    if unknown:
        raise ConfigError(f"--train-only: unknown component(s) {', '.join(unknown)}; "
                          f"choose among {', '.join(COMPONENTS)}")
    model.requires_grad_(False)
    for name in train_only:
        for p in found[name]:
            p.requires_grad_(True)


def _target_matrices(model: nn.Module, target: str) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of each matrix a LoRA target names."""
    blocks = list(model.blocks)
    if target == "in":
        return [(b, "expand") for b in blocks]
    if target == "out":
        return [(b, "project") for b in blocks]
    if target == "gate":
        if any(b.gate is None for b in blocks):
            raise ConfigError("--lora-targets gate: the model has no gate (--gate none); drop gate from the targets")
        return [(b, "gate") for b in blocks]
    if target == "head":
        if model.head.weight is model.embed.weight:
            # An adapter on a tied matrix would also move the embedding, which --lora-targets did not ask for.
            raise ConfigError("--lora-targets head: the head shares its matrix with the embedding; drop head")
        return [(model.head, "weight")]
    raise ConfigError(f"--lora-targets: unknown target {target!r}; choose among {', '.join(TARGETS)}")


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], train_only: list[str] = ()) -> int:
    """Freeze every base weight of `model` but those of the components in `train_only` (see `freeze_except`), and
    add a `LoRA` of `rank` to each matrix the `targets` name. Returns the number of trainable parameters."""
    if rank < 1:
        raise ConfigError(f"--lora-rank must be >= 1 to add adapters (got {rank})")
    matrices = [m for target in targets for m in _target_matrices(model, target)]  # refuse before changing anything
    freeze_except(model, list(train_only))
    for module, name in matrices:
        weight = getattr(module, name)
        if weight.requires_grad:
            raise ConfigError(f"--train-only trains a matrix that --lora-targets adapts ({name}); choose one of them")
        lora = LoRA(*weight.shape, rank=rank, alpha=alpha, device=weight.device, dtype=weight.dtype)
        parametrize.register_parametrization(module, name, lora)
    return trainable_params(model)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- --init-from


@dataclass
class InitWeights:
    """A trained run's weights, as plain `model.GPT` state (adapters merged), and where they came from."""

    run_dir: Path
    config: dict[str, Any]  # the run's config.json
    checkpoint: Path
    step: int
    state: dict[str, Tensor]


def read_run_config(run_dir: Path | str) -> dict[str, Any]:
    """An --init-from run's config.json; a ConfigError if the folder is not a language-model run."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--init-from {run_dir}: not a run folder (it has no config.json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--init-from {run_dir}: cannot read its config.json ({exc})") from None
    if config.get("task", "lm") != "lm":
        raise ConfigError(f"--init-from {run_dir}: a --task {config.get('task')} run; only language-model runs "
                          "can be fine-tuned")
    return config


def inherited_settings(run_dir: Path | str) -> dict[str, Any]:
    """The settings a fine-tune of `run_dir` takes from it when the command does not give them (`INHERITED`)."""
    config = read_run_config(run_dir)
    return {k: config[k] for k in INHERITED if k in config}


def check_architecture(cfg: RunConfig, run_config: dict[str, Any], run_dir: Path | str) -> None:
    """Refuse, in one line naming the differing settings, a config whose weights the run's cannot fill."""
    diffs = [f"--{k.replace('_', '-')} {getattr(cfg, k)} vs {run_config.get(k)}"
             for k in ARCHITECTURE if getattr(cfg, k) != run_config.get(k)]
    if diffs:
        raise ConfigError(f"--init-from {run_dir} has another architecture (command vs run): {'; '.join(diffs)}; "
                          "drop these flags to take the run's")


def check_init(cfg: RunConfig) -> None:
    """Before any work: the --init-from run exists, is a language-model run of this architecture, and has a
    checkpoint to start from."""
    if cfg.init_from is None:
        return
    check_architecture(cfg, read_run_config(cfg.init_from), cfg.init_from)
    if not list_checkpoints(Path(cfg.init_from)):
        raise ConfigError(f"--init-from {cfg.init_from}: the run has no checkpoint to start from "
                          "(it was trained with --checkpoint-every 0, or has not checkpointed yet)")


def load_init(run_dir: Path | str) -> InitWeights:
    """The final weights of a run: its newest checkpoint (the final one, once the run completed), as plain
    `model.GPT` state: wrapper prefixes stripped, the adapters of a fine-tuned run merged into its weights."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"--init-from {run_dir}: the run has no checkpoint to start from")
    try:
        saved = load_checkpoint(found[-1])
    except CheckpointError as exc:
        raise ConfigError(f"--init-from {run_dir}: {exc}") from None
    step = int(saved["loop"]["step"])
    status = _status(run_dir)
    if status != "completed":
        logger.warning("--init-from %s: the run is %s; starting from its latest checkpoint, at step %d",
                       run_dir, status or "unfinished", step)
    state = merged_state_dict(saved["model"], config.get("lora_alpha", 0), config.get("lora_rank", 0))
    return InitWeights(run_dir, config, found[-1], step, state)


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def merged_state_dict(state: dict[str, Tensor], lora_alpha: float = 0, lora_rank: int = 0) -> dict[str, Tensor]:
    """`state` as a plain `model.GPT` state dict: without the `_orig_mod.` / `module.` prefixes of a compiled or
    DDP model, and with each adapted matrix W + (lora_alpha / lora_rank) B A in place of W and its adapters."""
    bare = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        bare[key] = value
    out = {}
    for key, value in bare.items():
        match = _ADAPTED.match(key)
        if match is None:
            if ".parametrizations." not in key:
                out[key] = value
            continue
        prefix = key[: -len(".original")]
        A, B = bare[f"{prefix}.0.lora_A"], bare[f"{prefix}.0.lora_B"]
        scale = lora_alpha / lora_rank if lora_rank else lora_alpha / A.shape[0]
        out[f"{match['module']}.{match['name']}"] = value + scale * (B @ A)
    return out


# ----------------------------------------------------------------------------------------------- the run


def prepare_model(model: nn.Module, cfg: RunConfig) -> dict[str, Any]:
    """Apply --init-from, --train-only and --lora-* to a freshly built `model.GPT`, in that order, and return what
    config.json records of it: the checkpoint the weights came from. The summary's memory record counts the
    parameters that train (`trainable_params`)."""
    train_only = parse_names(cfg.train_only)
    record: dict[str, Any] = {}
    if cfg.init_from is not None:
        check_init(cfg)
        init = load_init(cfg.init_from)
        try:
            model.load_state_dict(init.state)
        except RuntimeError as exc:  # shapes agree when the architecture does: a damaged or foreign checkpoint
            raise ConfigError(f"--init-from {cfg.init_from}: its weights do not fit the model "
                              f"({str(exc).splitlines()[0]})") from None
        record.update(init_checkpoint=str(init.checkpoint), init_step=init.step)
    elif cfg.lora_rank or train_only:
        # Allowed, as an ablation (adapters on random features), but rarely what was meant.
        logger.warning("--lora-rank or --train-only without --init-from: the frozen weights are the random "
                       "initialisation")
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, parse_names(cfg.lora_targets), train_only)
    elif train_only:
        freeze_except(model, train_only)
    if cfg.init_from is not None:
        logger.info("fine-tuning %s from step %s: %s of %s parameters train", cfg.init_from, f"{init.step:,}",
                    f"{trainable_params(model):,}", f"{sum(p.numel() for p in model.parameters()):,}")
    return record


def count_trainable(cfg: RunConfig) -> int:
    """The parameters a run of `cfg` trains, from its model built on the meta device (no memory, no weights
    read): all of them, unless --lora-rank or --train-only freezes some."""
    from hlb_gpt.data import get_tokenizer
    from hlb_gpt.model import GPT, GPTConfig, pad_vocab

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=pad_vocab(get_tokenizer(cfg.tokenizer).n_vocab), depth=cfg.depth,
                              width=cfg.width, max_seq_len=cfg.seq_len, gate=cfg.gate))
        train_only = parse_names(cfg.train_only)
        if cfg.lora_rank:
            return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, parse_names(cfg.lora_targets), train_only)
        if train_only:
            freeze_except(model, train_only)
        return trainable_params(model)
