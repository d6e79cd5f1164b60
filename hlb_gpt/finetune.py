"""Fine-tuning a trained run: start from its weights, then train low-rank adapters (LoRA) or a few components.

`prepare_model` applies `--train-only` and `--lora-rank` to a freshly built model, before the optimizer and the
filter see its parameters; `load_base` then loads the `--init-from` base into it when the run starts afresh
(never when it resumes: its checkpoints hold everything). The base is resolved once, before a sweep's first run,
and pinned in the sweep folder (`pin_base`). See docs/DESIGN.md, section 12.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
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

from hlb_gpt.components import task_of
from hlb_gpt.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from hlb_gpt.config import LORA_TARGETS, TRAIN_ONLY, ConfigError, RunConfig
from hlb_gpt.durable import write_durably

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


@dataclass(frozen=True)
class Base:
    """The checkpoint a fine-tune starts from, resolved once: the run it belongs to and the checkpoint file
    (absolute paths), the checkpoint's step and the sha256 of its bytes. config.json records it (`record`)."""

    run: str
    checkpoint: str
    step: int
    sha256: str

    def record(self) -> dict[str, Any]:
        return {"init_checkpoint": self.checkpoint, "init_step": self.step, "init_sha256": self.sha256}


# A fine-tune sweep's base, written into the sweep folder before its first run: every run of the sweep, in every
# worker and whenever it starts, starts from these weights, however the base run moved on since.
PINNED = "init-from.pt"


def read_run_config(run_dir: Path | str) -> dict[str, Any]:
    """An --init-from run's config.json; a ConfigError if the folder is not a language-model run."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--init-from {run_dir}: not a run folder (it has no config.json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--init-from {run_dir}: cannot read its config.json ({exc})") from None
    if not task_of(config).fine_tunes:
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


def resolve_base(run_dir: Path | str) -> tuple[Base, dict[str, Any], dict[str, Tensor]]:
    """The base of a fine-tune of `run_dir`: its newest checkpoint now (the final one, once the run completed),
    read once (its sha256 is that of the bytes loaded), with the run's config and its weights as plain
    `model.GPT` state: wrapper prefixes stripped, the adapters of a fine-tuned run merged into its weights."""
    run_dir = Path(run_dir).resolve()
    config = read_run_config(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"--init-from {run_dir}: the run has no checkpoint to start from")
    try:
        data = found[-1].read_bytes()
    except OSError as exc:  # pruned by the base's own training since it was listed
        raise ConfigError(f"--init-from {run_dir}: cannot read {found[-1].name} ({exc.strerror or exc}); "
                          "try again") from None
    try:
        saved = load_checkpoint(io.BytesIO(data))
    except CheckpointError as exc:
        raise ConfigError(f"--init-from {run_dir}: {found[-1].name}: {exc}") from None
    base = Base(str(run_dir), str(found[-1]), int(saved["loop"]["step"]), hashlib.sha256(data).hexdigest())
    status = _status(run_dir)
    if status != "completed":
        logger.warning("--init-from %s: the run is %s; starting from its latest checkpoint, at step %d",
                       run_dir, status or "unfinished", base.step)
    state = merged_state_dict(saved["model"], config.get("lora_alpha", 0), config.get("lora_rank", 0))
    return base, config, state


def pin_base(sweep_dir: Path | str, init_from: Path | str) -> Base:
    """The base every fine-tune of the sweep in `sweep_dir` starts from, fixed before its first run: the one
    pinned there already (by another worker, or an earlier start of the sweep), or else `init_from`'s newest
    checkpoint now, written there (`PINNED`) with its record and config. Two workers that pin at once agree:
    the file appears whole and only once (a hard link, which never replaces), and the later one reads it."""
    path = Path(sweep_dir) / PINNED
    wanted = str(Path(init_from).resolve())
    if not path.exists():
        base, config, state = resolve_base(init_from)
        path.parent.mkdir(parents=True, exist_ok=True)
        pin = {"base": dataclasses.asdict(base), "config": config, "model": state}
        try:  # if another worker pinned first (False), its base is the sweep's
            write_durably(path, lambda f: torch.save(pin, f), how="create")
        except OSError as exc:  # a full disk: no run starts from a base it could not keep
            raise ConfigError(f"--init-from {init_from}: cannot pin the base in {path} "
                              f"({exc.strerror or exc})") from None
    pinned = read_pinned(path)[0]
    if pinned.run != wanted:
        raise ConfigError(f"--init-from {init_from}: the fine-tunes in {sweep_dir} start from {pinned.run} "
                          f"(pinned in {path}); use another --out")
    return pinned


def read_pinned(path: Path) -> tuple[Base, dict[str, Any], dict[str, Tensor]]:
    """A sweep's pinned base (`pin_base`): its record, the base run's config and its weights."""
    try:
        saved = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"{exc}; remove it to pin the base again") from None
    return Base(**saved["base"]), saved["config"], saved["model"]


def starting_weights(cfg: RunConfig, sweep_dir: Path) -> tuple[Base, dict[str, Tensor]]:
    """What a fine-tune starting afresh starts from: its sweep's pinned base if it pinned this run's
    --init-from, else the base run's newest checkpoint now."""
    path = sweep_dir / PINNED
    if path.exists():
        base, config, state = read_pinned(path)
        if base.run == str(Path(cfg.init_from).resolve()):
            check_architecture(cfg, config, cfg.init_from)
            return base, state
    base, config, state = resolve_base(cfg.init_from)
    check_architecture(cfg, config, cfg.init_from)
    return base, state


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


def prepare_model(model: nn.Module, cfg: RunConfig) -> None:
    """Apply --train-only and --lora-* to a freshly built `model.GPT`, before the optimizer and the filter see its
    parameters. Its weights are still the random initialisation: a fine-tune that starts afresh loads its base
    into them afterwards (`load_base`), and one that resumes never reads its base again."""
    train_only = parse_names(cfg.train_only)
    if cfg.init_from is None and (cfg.lora_rank or train_only):
        # Allowed, as an ablation (adapters on random features), but rarely what was meant.
        logger.warning("--lora-rank or --train-only without --init-from: the frozen weights are the random "
                       "initialisation")
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, parse_names(cfg.lora_targets), train_only)
    elif train_only:
        freeze_except(model, train_only)


def load_base(model: nn.Module, cfg: RunConfig, sweep_dir: Path) -> Base:
    """Load the base of a fine-tune starting afresh (`starting_weights`) into its model, adapted or not: a plain
    weight W goes where the model keeps it, `...parametrizations.<name>.original` for an adapted matrix. The
    adapters keep their initialisation (B zero), so the model starts equal to the base."""
    base, state = starting_weights(cfg, sweep_dir)
    own = model.state_dict()
    placed = {}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        adapted = f"{module}.parametrizations.{name}.original" if module else f"parametrizations.{name}.original"
        placed[adapted if adapted in own else key] = value
    try:
        missing, unexpected = model.load_state_dict(placed, strict=False)
    except RuntimeError as exc:  # shapes agree when the architecture does: a damaged or foreign checkpoint
        raise ConfigError(f"--init-from {cfg.init_from}: its weights do not fit the model "
                          f"({str(exc).splitlines()[0]})") from None
    missing = [k for k in missing if not k.endswith((".lora_A", ".lora_B"))]
    if missing or unexpected:
        raise ConfigError(f"--init-from {cfg.init_from}: its weights do not fit the model (missing "
                          f"{', '.join(missing) or 'none'}; unexpected {', '.join(unexpected) or 'none'})")
    logger.info("fine-tuning %s from step %s: %s of %s parameters train", base.run, f"{base.step:,}",
                f"{trainable_params(model):,}", f"{sum(p.numel() for p in model.parameters()):,}")
    return base


def count_trainable(cfg: RunConfig) -> int:
    """The parameters a run of `cfg` trains, from its model built on the meta device (no memory, no weights
    read): all of them, unless --lora-rank or --train-only freezes some."""
    from hlb_gpt.model import GPT, gpt_config

    with torch.device("meta"):
        model = GPT(gpt_config(cfg))
        train_only = parse_names(cfg.train_only)
        if cfg.lora_rank:
            return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, parse_names(cfg.lora_targets), train_only)
        if train_only:
            freeze_except(model, train_only)
        return trainable_params(model)
