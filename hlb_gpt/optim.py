"""Optimizer side of a run: parameter groups, the learning-rate schedule, GrokAdamW, Muon beside AdamW.

Everything works from `named_parameters()` names, so the model never knows its optimizer and this module
never imports the model. See docs/DESIGN.md, sections 3 (groups, schedule) and 6 (GrokAdamW).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "GROUP_NAMES",
    "GatedMuon",
    "GrokAdamW",
    "MuonAdamW",
    "PowerLawSchedule",
    "grok_alpha",
    "grokking_signal",
    "group_of",
    "layer_index",
    "lr_lambda",
    "make_muon",
    "make_optimizer",
    "make_scheduler",
    "model_depth",
    "param_groups",
]

# ---------------------------------------------------------------------------------------------
# Parameter groups


@dataclass(frozen=True)
class _GroupRule:
    lr_mult: float
    decays: bool
    betas: tuple[float, float]


# After hlb-gpt v0.4. The order is the order of the groups handed to the optimizer.
_RULES: dict[str, _GroupRule] = {
    "matrices": _GroupRule(lr_mult=1.0, decays=True, betas=(0.9, 0.95)),
    "norms_embeddings": _GroupRule(lr_mult=32.0, decays=False, betas=(0.9, 0.95)),
    "position_bias": _GroupRule(lr_mult=100.0, decays=False, betas=(0.9, 0.95)),
    "head": _GroupRule(lr_mult=2.0, decays=False, betas=(0.6, 0.95)),
}
GROUP_NAMES: tuple[str, ...] = tuple(_RULES)
_EPS = 1e-9

_LEAF_GROUP = {
    "expand": "matrices",
    "project": "matrices",
    "gate": "matrices",
    "norm": "norms_embeddings",
    "embed": "norms_embeddings",
    "position_bias": "position_bias",
    "head": "head",
}
# Prefixes added by DDP (`module.`) and torch.compile (`_orig_mod.`); they say nothing about the role.
_WRAPPERS = frozenset({"module", "_orig_mod"})
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def _parts(name: str) -> list[str]:
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return parts


def group_of(name: str, ndim: int) -> str:
    """The group a parameter belongs to, from its name (`blocks.3.expand`, `head.weight`, ...).

    Unknown names go by shape: matrices if ``ndim >= 2`` (they get weight decay), else norms.
    """
    parts = _parts(name)
    leaf = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    if leaf in _LEAF_GROUP:
        return _LEAF_GROUP[leaf]
    return "matrices" if ndim >= 2 else "norms_embeddings"


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float
) -> list[dict]:
    """Optimizer parameter groups with the per-group lr multipliers, betas and weight decay of hlb-gpt v0.4.

    Each group carries ``name`` (one of `GROUP_NAMES`) and ``names`` (its parameters' names, used by
    GrokAdamW for the layer index). Frozen parameters are left out, as are empty groups.
    """
    members: dict[str, tuple[list[nn.Parameter], list[str]]] = {g: ([], []) for g in _RULES}
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:  # a tied weight is optimized once
            continue
        seen.add(id(p))
        params, names = members[group_of(name, p.ndim)]
        params.append(p)
        names.append(name)
    groups = []
    for group_name, (params, names) in members.items():
        if not params:
            continue
        rule = _RULES[group_name]
        groups.append(
            {
                "params": params,
                "names": names,
                "name": group_name,
                "lr": lr * rule.lr_mult,
                "weight_decay": weight_decay if rule.decays else 0.0,
                "betas": rule.betas,
                "eps": _EPS,
            }
        )
    return groups


def _fused_device_types() -> frozenset[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a private helper; fall back to what torch 2.13 lists
        return frozenset({"cuda", "cpu", "mps", "xpu"})
    return frozenset(_get_fused_kernels_supported_devices())


def make_optimizer(groups: list[dict], device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW for `groups` (from `param_groups`), fused where torch has fused kernels for `device_type` (only the
    fused kernel honours ``optimizer.found_inf``, which the trainer uses to skip non-finite steps without a host
    sync), else multi-tensor (foreach). The extra group keys ``name``/``names`` are kept. Fused AdamW is one pass
    already: it has no compiled form. The other optimizers are built by their components (`hlb_gpt.components`).
    """
    if device_type in _fused_device_types():
        try:
            return torch.optim.AdamW(groups, fused=True)
        except RuntimeError:  # e.g. a dtype the fused kernel does not take
            pass
    return torch.optim.AdamW(groups, foreach=True)


# ---------------------------------------------------------------------------------------------
# Muon beside AdamW


class _States(Mapping):
    """The per-parameter state of several optimizers as one read-only mapping, read live from each of them
    (their ``state`` is replaced by ``load_state_dict``, and grows at their first step)."""

    def __init__(self, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: Tensor) -> dict:
        for opt in self._optimizers:
            if param in opt.state:  # `in`, not indexing: indexing a defaultdict would add the key
                return opt.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class MuonAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on the block matrices and AdamW on every other parameter, as one optimizer.

    The loop, the scheduler and the checkpoints see one optimizer: ``param_groups`` are the Muon groups then
    the AdamW groups -- the very dicts the two optimizers read, so the scheduler's LambdaLR sets the lr of
    both with the same multiplier, each from its own base lr. ``state`` holds both optimizers' state
    (memory accounting reads it), ``state_dict()`` both, under the two `keys` its component names them by.

    It honours ``found_inf`` (a 0-dim tensor, nonzero = skip the step) when its AdamW is fused, the only AdamW
    that does, or absent: `GatedMuon` and fused AdamW then both skip a non-finite step on the device, with no host
    sync (`skips_on_device`). With a foreach AdamW (a device without fused kernels) the trainer checks on the host.

    `adamw` is None when every trainable parameter is a Muon matrix (a LoRA fine-tune: only adapters train);
    its state is then None too.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.Optimizer | None,
                 keys: tuple[str, str] = ("matrices", "rest")) -> None:
        self.muon, self.adamw, self.keys = muon, adamw, keys
        self._inner = tuple(o for o in (muon, adamw) if o is not None)
        # The base class registers the inner optimizers' group dicts as they are (it adds no defaults).
        super().__init__([g for o in self._inner for g in o.param_groups], defaults={})
        self._share()

    @property
    def skips_on_device(self) -> bool:
        return isinstance(self.muon, GatedMuon) and (self.adamw is None or bool(self.adamw.defaults.get("fused")))

    def _share(self) -> None:
        self.param_groups = [g for o in self._inner for g in o.param_groups]
        self.state = _States(self._inner)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not self.skips_on_device:
            raise RuntimeError("this Muon + AdamW cannot skip a step on the device (its AdamW is not fused): "
                               "check for non-finite gradients before step() instead of setting found_inf")
        for optimizer in self._inner:
            optimizer.found_inf = found_inf
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        muon, adamw = self.keys
        return {muon: self.muon.state_dict(), adamw: None if self.adamw is None else self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        muon, adamw = self.keys
        if set(state_dict) != set(self.keys) or (state_dict[adamw] is None) != (self.adamw is None):
            raise ValueError(f"not a Muon + AdamW optimizer state of these parameters (keys {sorted(state_dict)})")
        self.muon.load_state_dict(state_dict[muon])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict[adamw])
        self._share()  # loading made new group dicts: the scheduler must write the lr into those


def make_muon(groups: list[dict], lr: float, momentum: float, device_type: str = "cpu",
              keys: tuple[str, str] = ("matrices", "rest")) -> MuonAdamW:
    """Muon (lr `lr`, `momentum`, Nesterov) for the 2-D parameters of the ``matrices`` group, AdamW (as
    `make_optimizer` makes it) for the rest of `groups` (from `param_groups`), in one `MuonAdamW` whose state_dict
    names their states by `keys`.

    Muon keeps the group's weight decay, decoupled as in AdamW (``p *= 1 - lr * weight_decay``), and torch's
    default ("original") lr adjustment: ``lr * sqrt(max(1, rows / cols))`` per matrix.
    """
    muon_groups, adamw_groups = [], []
    for group in groups:
        if group["name"] != "matrices":
            adamw_groups.append(group)
            continue
        flat = [i for i, p in enumerate(group["params"]) if p.ndim == 2]
        rest = [i for i in range(len(group["params"])) if i not in flat]
        pick = lambda key, idx: [group[key][i] for i in idx]  # noqa: E731
        if flat:
            muon_groups.append({"params": pick("params", flat), "names": pick("names", flat), "name": "matrices",
                                "lr": lr, "momentum": momentum, "weight_decay": group["weight_decay"]})
        if rest:  # a matrix of more than 2 dims: Muon orthogonalises 2-D updates only
            adamw_groups.append({**group, "params": pick("params", rest), "names": pick("names", rest)})
    if not muon_groups:  # `RunConfig` refuses the fine-tunes that train no matrix before any work
        raise ValueError("--optimizer muon needs block matrices (or LoRA adapters) to train")
    return MuonAdamW(GatedMuon(muon_groups, lr=lr, momentum=momentum),
                     make_optimizer(adamw_groups, device_type=device_type) if adamw_groups else None, keys)


class GatedMuon(torch.optim.Muon):
    """`torch.optim.Muon` that honours ``found_inf`` as fused AdamW does: a 0-dim tensor, nonzero = skip the step.

    torch's Muon has neither a fused path nor ``found_inf``. Here each matrix's new momentum and new weights are
    computed as torch computes them, out of place, then selected against the old ones on the device
    (``torch.where``): a skipped step leaves both bit for bit, and no value is read back to the host. Without
    ``found_inf`` it is torch's own step; with ``found_inf = 0`` it gives the same bits.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return super().step(closure)
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # torch's own, so the bits agree

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = _SkipFlag(found_inf)
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError("Muon supports dense real parameters only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf, grad, found = state["momentum_buffer"], p.grad, skip.found(p.device)
                # torch.optim._muon._single_tensor_muon, out of place.
                new_buf = buf.lerp(grad, 1 - momentum)
                update = grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
                update = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                new_p = p.mul(1 - lr * group["weight_decay"])
                new_p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
                buf.copy_(torch.where(found, buf, new_buf))
                p.copy_(torch.where(found, p, new_p))
        return loss


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


@dataclass(frozen=True)
class PowerLawSchedule:
    """lr multiplier: linear warmup from `start_mult` to 1, then ``(step + 1 - warmup_steps) ** exponent``.

    hlb-gpt's "infinite" schedule: no end point, so a run can be extended. A dataclass rather than a
    lambda so that `LambdaLR.state_dict()` saves it and checkpoints restore it.
    """

    warmup_steps: int = 100
    start_mult: float = 0.02
    exponent: float = -0.08

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not 0.0 <= self.start_mult <= 1.0:
            raise ValueError(f"start_mult must be in [0, 1] (got {self.start_mult})")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_mult + (1.0 - self.start_mult) * step / self.warmup_steps
        return float((step + 1 - self.warmup_steps) ** self.exponent)


def lr_lambda(
    warmup_steps: int = 100, start_mult: float = 0.02, exponent: float = -0.08
) -> Callable[[int], float]:
    """The warmup-then-power-law schedule as a picklable callable (see `PowerLawSchedule`)."""
    return PowerLawSchedule(warmup_steps, start_mult, exponent)


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 100
) -> torch.optim.lr_scheduler.LambdaLR:
    """The same warmup + power-law multiplier for every group (each keeps its own base lr)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps))


# ---------------------------------------------------------------------------------------------
# GrokAdamW


def layer_index(name: str, depth: int) -> int:
    """The "layer" of a parameter for layer-wise momentum: embeddings 0, block i -> i + 1,
    the final norm and the head -> depth + 1; any other name -> 0."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1 if _parts(name)[0] in ("norm", "head") else 0


def model_depth(names: Iterable[str]) -> int:
    """Number of blocks implied by parameter names: the largest block index + 1 (0 if none)."""
    return max((int(m.group(1)) + 1 for m in map(_BLOCK.search, names) if m), default=0)


def grokking_signal(train_loss: float, val_loss: float) -> float:
    """``max(0, val - train) / max(val, train)``, 0 when both losses are 0."""
    scale = max(val_loss, train_loss)
    return max(0.0, val_loss - train_loss) / scale if scale > 0 else 0.0


def grok_alpha(alpha_init: float, kappa: float, signal: float) -> float:
    """``alpha_init * exp(-kappa * s)`` clamped to [0, alpha_init]."""
    alpha = alpha_init * math.exp(min(-kappa * signal, 700.0))  # 700: keep exp finite for kappa < 0
    return min(max(alpha, 0.0), alpha_init)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


@dataclass
class _Coefficients:
    """Scalars of one update for params sharing (device, dtype, layer).

    The ``*_decay`` factors and `keep` are 0-dim tensors when a skip flag is in play (they become
    exactly 1 / 0 on a skipped step), python floats otherwise. The ``*_weight`` factors multiply a
    gradient that is zero on a skipped step, so they can stay floats.
    """

    mu_decay: float | Tensor  # alpha_t
    mu_weight: float  # 1 - alpha_t
    lamb: float
    m_decay: float | Tensor  # beta1_l
    m_weight: float  # 1 - beta1_l
    v_decay: float | Tensor  # beta2
    v_weight: float  # 1 - beta2
    param_decay: float | Tensor  # 1 - lr * weight_decay
    lr: float
    eps: float
    log_beta1: float  # log(beta1_l): 1 - beta1_l**t = -expm1(t * log beta1_l), accurate for beta -> 1
    log_beta2: float
    found: Tensor | None  # bool, True = skip this step
    keep: float | Tensor  # 1.0, or 0-dim tensor 0./1.


class _SkipFlag:
    """`found_inf` on each device, and exact step-or-skip scalars made from it, all without a host sync."""

    def __init__(self, found_inf: Tensor | None) -> None:
        self.found_inf = found_inf
        self._found: dict[torch.device, Tensor] = {}
        self._picks: dict[tuple, Tensor] = {}

    def found(self, device: torch.device) -> Tensor | None:
        if self.found_inf is None:
            return None
        if device not in self._found:
            self._found[device] = self.found_inf.to(device, non_blocking=True) != 0
        return self._found[device]

    def pick(self, device: torch.device, dtype: torch.dtype, value: float, if_skipped: float) -> float | Tensor:
        """`value`, or `if_skipped` on a skipped step; exact in both cases (no arithmetic on the flag)."""
        found = self.found(device)
        if found is None:
            return value
        # float64 params need float64 factors to match python scalars; bf16/fp16 get float32 (see GrokAdamW).
        dtype = torch.promote_types(dtype, torch.float32)
        key = (device, dtype, value, if_skipped)
        if key not in self._picks:
            full = torch.full((), value, dtype=dtype, device=device)
            self._picks[key] = full.masked_fill_(found, if_skipped)
        return self._picks[key]


class GrokAdamW(torch.optim.Optimizer):
    """AdamW on a Grokfast-EMA-amplified gradient with layer-wise momentum.

    Per parameter, with ``l`` its layer (`layer_index`: embeddings 0, block i -> i + 1, final norm and
    head -> depth + 1) and ``t`` its step::

        alpha_t = clamp(alpha_init * exp(-kappa * s), 0, alpha_init)
        mu      = alpha_t * mu + (1 - alpha_t) * g
        g_hat   = g + lamb * mu
        p      *= 1 - lr * weight_decay
        beta1_l = beta1 * (1 - gamma) ** l
        m       = beta1_l * m + (1 - beta1_l) * g_hat
        v       = beta2 * v + (1 - beta2) * g_hat ** 2
        p      -= lr / (1 - beta1_l ** t) * m / (sqrt(v / (1 - beta2 ** t)) + eps)

    ``s`` is the grokking signal handed over by `set_grokking_signal` (0 until then).

    ``mu`` starts at zeros, like Adam's moments (and the published GrokAdamW), so the first step gives
    ``mu = (1 - alpha_t) * g``: the amplification ramps in over about ``1 / (1 - alpha_t)`` steps,
    alongside the lr warmup, instead of starting at full strength. This differs on purpose from the
    standalone Grokfast filter (``mu_1 = g``).

    Layers come from parameter names: a group's ``names`` (as made by `param_groups`) or torch's
    ``param_names`` (when built from ``named_parameters()``); ``depth`` is taken from all groups' names.
    Parameters without names are layer 0. ``l`` is fixed in each parameter's state at its first step.

    All state lives in ``self.state[p]`` (``step``, ``exp_avg``, ``exp_avg_sq``, ``mu``, ``layer``) and
    the signal in every group's ``grokking_signal``, so ``state_dict()`` holds everything.

    Skipping non-finite steps: if ``optimizer.found_inf`` is set (a 0-dim tensor, non-zero = skip),
    params and state are left bit-for-bit unchanged on a skip, decided on the device with no host sync
    (the decay factors become 0-dim tensors selected by the flag). ``grad_scale`` (unscaling inside the
    step) is not supported: unscale first.

    ``foreach=True`` (default) updates the tensors of each (device, dtype, layer) with ``torch._foreach_*``
    ops, which on the CPU beat the one per-tensor update run eagerly (bench/grokadamw.py); ``foreach=False``
    runs that per-tensor update (the body ``compile=True`` compiles) eagerly; the two agree to float rounding.
    Steps live on the parameter's device (no sync to read them), so the bias-corrected step size is a 0-dim
    tensor; with bfloat16/float16 *parameters* foreach kernels round tensor factors (the step size always, the decay factors when ``found_inf`` is set) to the parameter dtype, as
    torch's capturable AdamW does (0.9 becomes 0.8984 in bfloat16). Float32 master weights (autocast)
    are unaffected.

    ``compile=True`` replaces both with one ``torch.compile``d function per (device, dtype) that updates
    every tensor in a single fused pass: it reads p, g, mu, m, v and writes p, mu, m, v (9 passes over
    parameter-sized memory, against 7 for fused AdamW and about 32 for the foreach path's chain of
    ``_foreach`` ops). Every hyperparameter -- lr, the betas, alpha_t, lamb, weight decay, eps, the
    logs behind the bias corrections -- reaches the graph as a row of one small tensor, so a scheduler
    changing lr every step, a new grokking signal or another setting of a sweep never recompiles; the
    graph is specialised only to the parameters' shapes and layers. A skipped step selects the old
    values (``torch.where``), so it leaves params and state bit-for-bit unchanged. Results equal the
    foreach path's to float rounding (about 1e-7 relative for float32); bfloat16 tensors are updated
    in float32 and rounded once. If compiling fails, the step says so once in the log and runs eagerly
    from then on (`compile` turns False). `compile` is how the step runs, not what it computes: it is
    not a group setting and a checkpoint does not carry it.
    """

    skips_on_device = True  # it honours `found_inf` (see above)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        alpha_init: float = 0.98,
        lamb: float = 2.0,
        gamma: float = 0.1,
        kappa: float = 0.1,
        *,
        foreach: bool = True,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            alpha_init=alpha_init,
            lamb=lamb,
            gamma=gamma,
            kappa=kappa,
            grokking_signal=0.0,
            foreach=foreach,
        )
        super().__init__(params, defaults)
        self.compile = compile

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group added after the first follows the signal the others already have.
        inherit = bool(self.param_groups) and "grokking_signal" not in param_group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if inherit:
            group["grokking_signal"] = self.param_groups[0]["grokking_signal"]
        _check_group(group)
        names = group.get("names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(
                f"group {group.get('name', len(self.param_groups) - 1)!r} has {len(group['params'])} "
                f"params but {len(names)} names"
            )

    def set_grokking_signal(self, train_loss: float | Tensor, val_loss: float | Tensor) -> float:
        """Feed the latest evaluation: sets ``s = max(0, val - train) / max(val, train)`` for every group.

        Non-finite losses (a diverging run) leave the signal as it was. Returns the signal in use.
        """
        train, val = float(train_loss), float(val_loss)
        if math.isfinite(train) and math.isfinite(val):
            signal = grokking_signal(train, val)
            for group in self.param_groups:
                group["grokking_signal"] = signal
        return self.param_groups[0]["grokking_signal"]

    def _names(self, group: dict) -> list[str] | None:
        return group.get("names") or group.get("param_names")

    def _depth(self) -> int:
        return model_depth(n for g in self.param_groups for n in (self._names(g) or ()))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("GrokAdamW does not unscale gradients: unscale them before step()")
        skip = _SkipFlag(getattr(self, "found_inf", None))
        buckets = self._buckets()
        if self.compile:
            buckets = self._step_compiled(buckets, skip)  # what is left: none, unless compiling failed
        for (index, device, dtype, layer), members in buckets.items():
            group = self.param_groups[index]
            states = [s for _, s in members]
            tensors = ([p for p, _ in members], [p.grad for p, _ in members], [s["mu"] for s in states],
                       [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
            if group["foreach"]:
                _foreach_update(*tensors, _coefficients(group, layer, skip, device, dtype))
            else:  # the compiled step's body, run eagerly
                hyper = torch.tensor([_hyper_row(group, layer)], dtype=torch.promote_types(dtype, torch.float32))
                _fused_update(*tensors, hyper.to(device, non_blocking=True), (0,) * len(members), skip.found(device))
        return loss

    def _buckets(self) -> dict[tuple[int, torch.device, torch.dtype, int], list[tuple[Tensor, dict]]]:
        """Params with a gradient, by (group index, device, dtype, layer): the tensors one update call takes.
        Creates the state of params seen for the first time."""
        depth: int | None = None
        buckets: dict[tuple[int, torch.device, torch.dtype, int], list[tuple[Tensor, dict]]] = {}
        for index, group in enumerate(self.param_groups):
            names = self._names(group)
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError("GrokAdamW supports dense real parameters only")
                state = self.state[p]
                if not state:
                    if depth is None:
                        depth = self._depth()
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["layer"] = layer_index(names[i], depth) if names else 0
                elif state["step"].device != p.device:  # load_state_dict keeps `step` where it was saved
                    state["step"] = state["step"].to(p.device)
                buckets.setdefault((index, p.device, p.dtype, state["layer"]), []).append((p, state))
        return buckets

    def _step_compiled(self, buckets: dict, skip: _SkipFlag) -> dict:
        """One compiled call per (device, dtype) over all buckets; returns the buckets it could not update."""
        calls: dict[tuple[torch.device, torch.dtype], list] = {}
        for key, members in buckets.items():
            calls.setdefault(key[1:3], []).append(key)
        left = {}
        for (device, dtype), keys in calls.items():
            # Python floats, rounded once into the tensor: the same scalars the foreach path passes.
            rows = [_hyper_row(self.param_groups[index], layer) for index, _, _, layer in keys]
            hyper = torch.tensor(rows, dtype=torch.promote_types(dtype, torch.float32)).to(device, non_blocking=True)
            members = [(p, s, row) for row, key in enumerate(keys) for p, s in buckets[key]]
            try:
                _compiled_update()(
                    [p for p, _, _ in members], [p.grad for p, _, _ in members], [s["mu"] for _, s, _ in members],
                    [s["exp_avg"] for _, s, _ in members], [s["exp_avg_sq"] for _, s, _ in members],
                    [s["step"] for _, s, _ in members], hyper, tuple(r for _, _, r in members), skip.found(device),
                )
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a compiler problem must not end the run: it fails before any kernel runs
                logger.warning("GrokAdamW: the compiled step failed (%s: %s); stepping eagerly from now on",
                               type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                self.compile = False
                left.update({key: buckets[key] for key in keys})
        return left


def _check_group(group: dict) -> None:
    beta1, beta2 = group["betas"]
    checks = {
        "lr": group["lr"] >= 0,
        "eps": group["eps"] >= 0,
        "betas": 0 <= beta1 < 1 and 0 <= beta2 < 1,
        "weight_decay": group["weight_decay"] >= 0,
        "alpha_init": 0 <= group["alpha_init"] < 1,
        "lamb": group["lamb"] >= 0,
        "gamma": 0 <= group["gamma"] <= 1,
        "kappa": math.isfinite(group["kappa"]),
    }
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"GrokAdamW: invalid {key} {group[key]!r}")


def _coefficients(
    group: dict, layer: int, skip: _SkipFlag, device: torch.device, dtype: torch.dtype
) -> _Coefficients:
    alpha = grok_alpha(group["alpha_init"], group["kappa"], group["grokking_signal"])
    beta1, beta2 = group["betas"]
    beta1_l = beta1 * (1.0 - group["gamma"]) ** layer
    return _Coefficients(
        mu_decay=skip.pick(device, dtype, alpha, 1.0),
        mu_weight=1.0 - alpha,
        lamb=group["lamb"],
        m_decay=skip.pick(device, dtype, beta1_l, 1.0),
        m_weight=1.0 - beta1_l,
        v_decay=skip.pick(device, dtype, beta2, 1.0),
        v_weight=1.0 - beta2,
        param_decay=skip.pick(device, dtype, 1.0 - group["lr"] * group["weight_decay"], 1.0),
        lr=group["lr"],
        eps=group["eps"],
        log_beta1=_log(beta1_l),
        log_beta2=_log(beta2),
        found=skip.found(device),
        keep=skip.pick(device, dtype, 1.0, 0.0),
    )


# Columns of the hyperparameter table the compiled step reads: one row per (group, layer).
_HYPER = ("mu_decay", "mu_weight", "lamb", "param_decay", "m_decay", "m_weight", "v_decay", "v_weight", "lr", "eps",
          "log_beta1", "log_beta2")
_H = {name: i for i, name in enumerate(_HYPER)}


def _hyper_row(group: dict, layer: int) -> list[float]:
    """The scalars of `_coefficients` that do not depend on a skip flag, in `_HYPER` order."""
    alpha = grok_alpha(group["alpha_init"], group["kappa"], group["grokking_signal"])
    beta1, beta2 = group["betas"]
    beta1_l = beta1 * (1.0 - group["gamma"]) ** layer
    values = dict(mu_decay=alpha, mu_weight=1.0 - alpha, lamb=group["lamb"],
                  param_decay=1.0 - group["lr"] * group["weight_decay"], m_decay=beta1_l, m_weight=1.0 - beta1_l,
                  v_decay=beta2, v_weight=1.0 - beta2, lr=group["lr"], eps=group["eps"], log_beta1=_log(beta1_l),
                  log_beta2=_log(beta2))
    return [float(values[name]) for name in _HYPER]


def _fused_update(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hyper: Tensor,
    rows: tuple[int, ...],
    found: Tensor | None,
) -> None:
    """The body compiled for ``compile=True``: the foreach path's formulas, one fused pass per tensor.

    `hyper` is (rows, len(_HYPER)) in the math dtype; tensor i uses row ``rows[i]``. With `found` (bool, True =
    skip), every new value is selected against the old one, so a skipped step changes nothing.
    """
    keep = None if found is None else ~found
    for p, g, mu, m, v, step, row in zip(params, grads, mus, exp_avgs, exp_avg_sqs, steps, rows):
        h = hyper[row]
        math_dtype = hyper.dtype
        g = g.to(math_dtype)
        new_mu = mu.to(math_dtype) * h[_H["mu_decay"]] + g * h[_H["mu_weight"]]
        g_hat = g + new_mu * h[_H["lamb"]]
        new_m = m.to(math_dtype) * h[_H["m_decay"]] + g_hat * h[_H["m_weight"]]
        new_v = v.to(math_dtype) * h[_H["v_decay"]] + g_hat * g_hat * h[_H["v_weight"]]
        new_step = step + 1
        neg_step_size = torch.expm1(new_step * h[_H["log_beta1"]]).reciprocal() * h[_H["lr"]]
        bias_correction2_sqrt = torch.expm1(new_step * h[_H["log_beta2"]]).neg().sqrt()
        denom = (new_v.sqrt() / bias_correction2_sqrt + h[_H["eps"]]) / neg_step_size
        new_p = p.to(math_dtype) * h[_H["param_decay"]] + new_m / denom
        if keep is not None:
            new_p, new_mu, new_m, new_v = (torch.where(keep, new, old) for new, old in
                                           ((new_p, p), (new_mu, mu), (new_m, m), (new_v, v)))
            new_step = torch.where(keep, new_step, step)
        p.copy_(new_p)
        mu.copy_(new_mu)
        m.copy_(new_m)
        v.copy_(new_v)
        step.copy_(new_step)


@functools.cache
def _compiled_update() -> Callable[..., None]:
    """`_fused_update` under torch.compile, made on first use (compiling is lazy, but importing dynamo is not free)."""
    return torch.compile(_fused_update, fullgraph=True, dynamic=False)


# On a skipped step the foreach update replaces the gradient by zeros (inf * 0 would be nan), zeroes g_hat,
# makes every decay factor 1, adds 0 to the step counter and makes the step size 0: nothing changes.


def _foreach_update(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    c: _Coefficients,
) -> None:
    if c.found is not None:
        grads = [torch.where(c.found, 0.0, g) for g in grads]
    torch._foreach_mul_(mus, c.mu_decay)
    torch._foreach_add_(mus, grads, alpha=c.mu_weight)
    g_hat = torch._foreach_add(grads, mus, alpha=c.lamb)
    if c.found is not None:
        torch._foreach_mul_(g_hat, c.keep)
    torch._foreach_mul_(params, c.param_decay)
    torch._foreach_mul_(exp_avgs, c.m_decay)
    torch._foreach_add_(exp_avgs, g_hat, alpha=c.m_weight)
    torch._foreach_mul_(exp_avg_sqs, c.v_decay)
    torch._foreach_addcmul_(exp_avg_sqs, g_hat, g_hat, value=c.v_weight)
    del g_hat
    if isinstance(c.keep, Tensor):  # `other=`: a positional 0-dim tensor binds to the Scalar overload (.item())
        torch._foreach_add_(steps, other=c.keep)
    else:
        torch._foreach_add_(steps, c.keep)
    t = torch._foreach_clamp_min(steps, 1.0)
    neg_step_size = torch._foreach_mul(t, c.log_beta1)
    torch._foreach_expm1_(neg_step_size)
    torch._foreach_reciprocal_(neg_step_size)
    torch._foreach_mul_(neg_step_size, c.lr)
    if c.found is not None:
        torch._foreach_mul_(neg_step_size, c.keep)
    bias_correction2_sqrt = torch._foreach_mul(t, c.log_beta2)
    torch._foreach_expm1_(bias_correction2_sqrt)
    torch._foreach_neg_(bias_correction2_sqrt)
    torch._foreach_sqrt_(bias_correction2_sqrt)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, c.eps)
    torch._foreach_div_(denom, neg_step_size)
    torch._foreach_addcdiv_(params, exp_avgs, denom)
