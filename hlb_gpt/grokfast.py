"""Grokfast gradient filters: EMA and windowed-mean (MA) amplification of slow gradients, in place on `p.grad`.

Shaped like a `torch.optim` optimizer (lazy `state`, `step()`, `state_dict()`) but not a subclass, so that no
learning-rate scheduler accepts a filter by mistake. A step runs as `torch._foreach_*` ops over all gradients,
or with `compile=True` as one torch.compile'd function of the tensor lists whose hyperparameters are 0-dim
tensors, so one graph serves every alpha, gain and window of a sweep (`foreach=False` runs that function
eagerly, which on the CPU is slower than the foreach ops: `bench/filter.py --paths`). Step counters are 0-dim
device tensors: skipping a non-finite step (`found_inf`) needs no host sync. One eager path serves steps with
and without `found_inf` (without it, nothing is skipped).

Semantics, dtypes, state and checkpoints: see docs/DESIGN.md, section 5 (Grokfast filters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from hlb_gpt.compiling import FallbackCompiled

__all__ = ["GradFilter", "NoFilter", "EMAFilter", "MAFilter"]

Key = str | int
GroupKey = tuple[torch.device, torch.dtype, torch.dtype]


def _split_named(params: Iterable[Tensor] | Iterable[tuple[str, Tensor]]) -> tuple[list[Tensor], list[Key]]:
    """Accept parameters or (name, parameter) pairs; names (or positions) key the state_dict."""
    items = list(params)
    if not items:
        raise ValueError("a gradient filter needs at least one parameter (got an empty list)")
    named = [isinstance(x, tuple) for x in items]
    if all(named):
        keys: list[Key] = [name for name, _ in items]
        tensors = [p for _, p in items]
    elif any(named):
        raise TypeError("pass either parameters or (name, parameter) pairs, not a mix")
    else:
        keys, tensors = list(range(len(items))), items
    if not all(isinstance(p, Tensor) for p in tensors):
        raise TypeError("gradient filters take tensors (model parameters)")
    if len({id(p) for p in tensors}) != len(tensors) or len(set(keys)) != len(keys):
        raise ValueError("a parameter (or name) appears twice in the filter's parameter list")
    return tensors, keys


def _check_gain(gain: float) -> float:
    if not gain >= 0:  # also rejects NaN
        raise ValueError(f"--gain must be >= 0 (got {gain})")
    return float(gain)


def _grouped(rows: list[tuple], key: Callable[[tuple], Any]) -> list[list[tuple]]:
    """Split rows by key (device and dtypes): foreach kernels need uniform lists to fuse."""
    groups: dict[Any, list[tuple]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return list(groups.values())


def _skipped(found_inf: Tensor | None, device: torch.device) -> Tensor:
    """``found_inf`` as a 0-dim bool on `device` (True: skip the step); no ``found_inf``: never skip."""
    if found_inf is None:
        return torch.zeros((), dtype=torch.bool, device=device)
    return found_inf.to(device, non_blocking=True) != 0


def _group_key(row: tuple) -> GroupKey:
    grad, first_state = row[1], row[2]
    return (grad.device, grad.dtype, first_state.dtype)


class GradFilter:
    """Base of the gradient filters: parameter bookkeeping, state_dict, nbytes, dispatch of step()."""

    kind = "none"
    """The tag of its checkpointed state: the name of the component that built it (`hlb_gpt.components`), which
    the records hold, else its class's name."""
    _buffers: tuple[str, ...] = ()  # names of the parameter-sized state tensors

    def __init__(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
                 dtype: torch.dtype | None = torch.float32, compile: bool = False, foreach: bool = True,
                 kind: str | None = None) -> None:
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"--filter-dtype must be a floating dtype (got {dtype})")
        self.kind = kind or type(self).__name__
        self.params, self._keys = _split_named(params)
        self.dtype = dtype
        self.state: dict[Tensor, dict[str, Any]] = {}
        # torch.compile is lazy: nothing is traced until the first step. Every filter shares one kernel
        # function, so its graph must not depend on the hyperparameters: they enter as 0-dim tensors.
        # Uncompiled, `foreach=False` runs that same kernel eagerly (bench/filter.py compares the two paths).
        self._fused: Callable[..., None] | None = (
            FallbackCompiled(self._kernel, f"the {self.kind.upper()} filter", fullgraph=True, dynamic=False)
            if compile else None if foreach else self._kernel)
        self._scalars: dict[torch.device, tuple[Tensor, ...]] = {}

    # -- public API -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, found_inf: Tensor | None = None) -> None:
        """Filter every ``p.grad`` in place; with ``found_inf`` (0-dim, 1.0 = skip) the state is kept."""
        live = [(p, p.grad) for p in self.params if p.grad is not None]
        if not live:
            return
        if any(g.is_sparse for _, g in live):
            raise RuntimeError("Grokfast filters do not support sparse gradients")
        if self._fused is not None:
            self._step_compiled(live, found_inf)
        else:
            self._step_eager(live, found_inf)

    def state_dict(self) -> dict:
        """Hyperparameters and per-parameter state (tensors and ints), keyed by name or position.

        Like ``torch.optim``, tensors are references to the live state: save or copy them at once.
        """
        state = {key: dict(self.state[p]) for p, key in zip(self.params, self._keys) if p in self.state}
        return {"filter": self.kind, **self._hyper(), "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state saved by ``state_dict()``; tensors are copied onto each parameter's device."""
        if state_dict.get("filter") != self.kind:
            raise ValueError(f"checkpoint holds a {state_dict.get('filter')!r} filter state, "
                             f"this run uses {self.kind!r}")
        self._check_hyper(state_dict)
        by_key = dict(zip(self._keys, self.params))
        unknown = set(state_dict["state"]) - set(by_key)
        if unknown:
            raise ValueError(f"filter state for unknown parameters: {sorted(map(str, unknown))}")
        self.state.clear()
        for key, saved in state_dict["state"].items():
            p = by_key[key]
            restored: dict[str, Any] = {}
            for name, value in saved.items():
                if isinstance(value, Tensor):
                    dtype = value.dtype if name == "step" else self._state_dtype(p)
                    value = value.detach().to(device=p.device, dtype=dtype, copy=True)
                restored[name] = value
            self._check_shapes(p, restored, key)
            self.state[p] = restored

    @property
    def nbytes(self) -> int:
        """Exact bytes of the parameter-sized state buffers (0-dim step counters excluded)."""
        return sum(st[name].numel() * st[name].element_size()
                   for st in self.state.values() for name in self._buffers)

    @torch.no_grad()
    def ratio(self) -> Tensor:
        """Global ||mu|| / ||g|| of the last step (0-dim, on device, no sync); NaN until the filter acts.

        ``mu`` is the EMA (or the window mean) and ``g`` the raw gradient, recovered from the filtered
        ``p.grad`` -- so call it after ``step()`` and before anything else changes the gradients.
        """
        device = self.params[0].device
        rows = [(p, self.state[p]) for p in self.params if p.grad is not None and p in self.state]
        if not rows:
            return torch.full((), math.nan, device=device)
        mu_sq, g_sq, acted_any = [], [], []
        for p, st in rows:
            mean, coeff, acted = self._signal(st)  # float32 mu, gain it was added with, bool 0-dim
            raw = p.grad.float() - torch.where(acted, coeff, 0.0) * mean
            mu_sq.append(torch.where(acted, mean.square().sum(), 0.0).to(device))
            g_sq.append(torch.where(acted, raw.square().sum(), 0.0).to(device))
            acted_any.append(acted.to(device))
        value = torch.stack(mu_sq).sum().sqrt() / torch.stack(g_sq).sum().sqrt()
        return torch.where(torch.stack(acted_any).any(), value, math.nan)

    # -- shared machinery -------------------------------------------------------------------------
    @property
    def compile_error(self) -> str | None:
        """Why the compiled step fell back to eager (None: it compiled, or was never asked to)."""
        return self._fused.error if isinstance(self._fused, FallbackCompiled) else None

    def _kernel_scalars(self, device: torch.device) -> tuple[Tensor, ...]:
        """The hyperparameters as the compiled kernel takes them: 0-dim tensors, made once per device."""
        if device not in self._scalars:
            self._scalars[device] = tuple(torch.tensor(v, device=device) for v in self._kernel_values())
        return self._scalars[device]

    def _kernel_values(self) -> tuple[float | int, ...]:
        return ()

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return p.dtype if self.dtype is None else self.dtype

    def _counter(self, device: torch.device, value: int) -> Tensor:
        return torch.full((), value, dtype=torch.int64, device=device)

    def _hyper(self) -> dict:
        return {}

    def _check_hyper(self, state_dict: dict) -> None:
        pass

    def _check_shapes(self, p: Tensor, st: dict, key: Key) -> None:
        for name in self._buffers:
            if st[name].shape != self._buffer_shape(name, p):
                raise ValueError(f"filter state {name!r} of parameter {key!r} has shape "
                                 f"{tuple(st[name].shape)}, expected {tuple(self._buffer_shape(name, p))}")

    def _buffer_shape(self, name: str, p: Tensor) -> torch.Size:
        return p.shape

    # subclasses provide these
    @staticmethod
    def _kernel(*args: Any) -> None:  # the body compiled when compile=True
        raise NotImplementedError

    def _step_eager(self, live: list[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
        raise NotImplementedError

    def _step_compiled(self, live: list[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
        raise NotImplementedError

    def _signal(self, st: dict) -> tuple[Tensor, Tensor | float, Tensor]:
        raise NotImplementedError


class NoFilter(GradFilter):
    """The disabled filter: a no-op with the same interface, so the training loop has no ``if``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] = ()) -> None:
        self.params, self._keys, self.state = list(params), [], {}

    def step(self, found_inf: Tensor | None = None) -> None:
        pass

    def state_dict(self) -> dict:
        return {"filter": self.kind, "state": {}}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("filter", self.kind) != self.kind:
            raise ValueError(f"checkpoint holds a {state_dict.get('filter')!r} filter state, "
                             "this run has the filter disabled")

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def compile_error(self) -> None:
        return None

    def ratio(self) -> Tensor:
        return torch.full((), math.nan)


# ------------------------------------------------------------------------------------------------
class EMAFilter(GradFilter):
    """``mu = alpha * mu + (1 - alpha) * g; g += gain * mu``; at a parameter's first step ``mu = g``
    (a copy) and the gradient is left unchanged."""

    _buffers = ("mu",)

    def __init__(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]], alpha: float = 0.98,
                 gain: float = 2.0, dtype: torch.dtype | None = torch.float32, compile: bool = False,
                 foreach: bool = True, kind: str | None = None) -> None:
        if not 0 <= alpha < 1:
            raise ValueError(f"--alpha must be in [0, 1) for the EMA filter (got {alpha})")
        self.alpha = float(alpha)
        self.gain = _check_gain(gain)
        super().__init__(params, dtype, compile, foreach, kind)

    def _hyper(self) -> dict:
        return {"alpha": self.alpha, "gain": self.gain}

    def _new_state(self, p: Tensor, g: Tensor) -> dict:
        """Zeros: the first accepted update sets mu = g."""
        return {"mu": torch.zeros_like(g, dtype=self._state_dtype(p)), "step": self._counter(g.device, 0)}

    def _step_eager(self, live: list[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
        # On a skipped step the gradient's value does not matter, so it is replaced by mu ("sanitised",
        # which also removes NaN/inf) and lerp runs with weight -0.0: mu + (-0.0 * (mu - mu)) adds
        # -0.0, the one addend that returns every mu bit for bit (a +0.0 weight would turn -0.0 into
        # +0.0).  On a parameter's first accepted step weight 1 and no gain give mu = g from a zero mu.
        for p, g in live:
            if p not in self.state:
                self.state[p] = self._new_state(p, g)
        rows = [(p, g, self.state[p]["mu"], self.state[p]["step"]) for p, g in live]
        for group in _grouped(rows, _group_key):
            _, grads, mus, steps = map(list, zip(*group))
            bad = _skipped(found_inf, grads[0].device)
            first = torch.stack(steps) == 0
            weight = torch.where(bad, -0.0, torch.where(first, 1.0, 1.0 - self.alpha)).unbind()
            coeff = torch.where(first, 0.0, self.gain).unbind()
            if grads[0].dtype == mus[0].dtype:
                for g, mu in zip(grads, mus):  # no foreach `where`: one kernel per tensor
                    torch.where(bad, mu, g, out=g)
                sources = grads
            else:
                sources = [torch.where(bad, mu, g.to(mu.dtype)) for g, mu in zip(grads, mus)]
            torch._foreach_lerp_(mus, sources, weight)
            torch._foreach_addcmul_(grads, mus, coeff)
            # `other=`: a positional 0-dim tensor binds to the Scalar overload, whose .item() is a host sync.
            torch._foreach_add_(steps, other=(~bad).long())

    def _step_compiled(self, live: list[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
        for p, g in live:
            if p not in self.state:
                self.state[p] = self._new_state(p, g)
        sts = [self.state[p] for p, _ in live]
        self._fused([s["mu"] for s in sts], [g for _, g in live], [s["step"] for s in sts],
                    found_inf, *self._kernel_scalars(live[0][1].device))

    def _kernel_values(self) -> tuple[float, float]:
        return (1.0 - self.alpha, self.gain)  # float32 tensors: 1 - alpha rounded once, as a Python scalar was

    @staticmethod
    def _kernel(mus: list[Tensor], grads: list[Tensor], steps: list[Tensor], found_inf: Tensor | None,
                one_minus_alpha: Tensor, gain: Tensor) -> None:
        """One fused pass per tensor: read g and mu, write mu and g (and the 0-dim counter)."""
        ok = None if found_inf is None else found_inf == 0
        for mu, g, step in zip(mus, grads, steps):
            first = step == 0
            math_dtype = torch.promote_types(mu.dtype, torch.float32)  # as eager lerp's internal math
            weight = torch.where(first, 1.0, one_minus_alpha).to(math_dtype)
            new_mu = torch.lerp(mu.to(math_dtype), g.to(math_dtype), weight).to(mu.dtype)
            if ok is not None:
                new_mu = torch.where(ok, new_mu, mu)
                step.add_(ok.to(step.dtype))
            else:
                step.add_(1)
            mu.copy_(new_mu)
            wide = torch.promote_types(g.dtype, mu.dtype)
            g.copy_(g.to(wide) + torch.where(first, 0.0, gain) * new_mu.to(wide))

    def _signal(self, st: dict) -> tuple[Tensor, float, Tensor]:
        return st["mu"].float(), self.gain, st["step"] >= 2


# ------------------------------------------------------------------------------------------------
class MAFilter(GradFilter):
    """``g += gain * mean(last W gradients)`` once W gradients have been seen.

    Precisely: at a parameter's k-th accepted step (k = 1, 2, ...) the gradient is pushed into its
    window; for k < W the gradient is left unchanged; from k = W on, ``gain`` times the mean of the W
    most recent gradients -- the current one included -- is added to it.
    """

    _buffers = ("ring", "sum")
    # Re-summing every K attempted steps: measured float32 drift |sum - exact| / |exact| after K
    # random-gradient updates is ~1e-7 (K=10), 3e-7 (K=100), 6e-7 (K=300), growing like sqrt(K);
    # K = W keeps it below 1e-6 up to W ~ 1000, beyond which K is capped (re-sum cost W/1000 passes).
    MAX_RESUM_EVERY = 1000

    def __init__(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]], window: int = 100,
                 gain: float = 5.0, dtype: torch.dtype | None = torch.float32, compile: bool = False,
                 resum_every: int | None = None, foreach: bool = True, kind: str | None = None) -> None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"--window must be an integer >= 1 (got {window!r})")
        if window < 1:
            raise ValueError(f"--window must be >= 1 (got {window})")
        if resum_every is not None and resum_every < 1:
            raise ValueError(f"resum_every must be >= 1 (got {resum_every})")
        self.window = window
        self.gain = _check_gain(gain)
        self.resum_every = min(window, self.MAX_RESUM_EVERY) if resum_every is None else resum_every
        super().__init__(params, dtype, compile, foreach, kind)

    def _hyper(self) -> dict:
        return {"window": self.window, "gain": self.gain}

    def _check_hyper(self, state_dict: dict) -> None:
        if state_dict.get("window") != self.window:
            raise ValueError(f"checkpoint holds an MA filter with --window {state_dict.get('window')}, "
                             f"this run uses --window {self.window}")

    def _buffer_shape(self, name: str, p: Tensor) -> torch.Size:
        return torch.Size((self.window, *p.shape)) if name == "ring" else p.shape

    def _new_state(self, p: Tensor, g: Tensor) -> dict:
        dtype = self._state_dtype(p)
        ring = torch.zeros((self.window, *g.shape), dtype=dtype, device=g.device)
        # "attempts" counts attempted steps (accepted or not) and schedules the exact re-summation on the
        # host; re-summing is valid at any time, so it need not know which steps were accepted.
        return {"ring": ring, "sum": torch.zeros_like(g, dtype=dtype), "step": self._counter(g.device, 0),
                "attempts": 0}

    def _ensure_state(self, live: list[tuple[Tensor, Tensor]]) -> list[dict]:
        for p, g in live:
            if p not in self.state:
                self.state[p] = self._new_state(p, g)
        return [self.state[p] for p, _ in live]

    def _count_call(self, sts: list[dict]) -> list[dict]:
        """Advance the attempt counters; return the states due for an exact re-summation."""
        due = []
        for st in sts:
            st["attempts"] += 1
            if st["attempts"] % self.resum_every == 0:
                due.append(st)
        return due

    def _step_eager(self, live: list[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
        # The ring position lives on the device, so slots are read and written with index ops.  On a
        # skipped step the incoming gradient is replaced by the slot's old value: the slot is rewritten
        # with itself and the sum loses old - old = +0.0, which leaves every bit (even -0.0) in place.
        sts = self._ensure_state(live)
        due = {id(st) for st in self._count_call(sts)}
        rows = list(zip((g for _, g in live), sts))
        for group in _grouped(rows, lambda r: r[0].device):
            bad = _skipped(found_inf, group[0][0].device)
            ok = (~bad).long()
            steps = torch.stack([st["step"] for _, st in group])
            positions = (steps % self.window).unsqueeze(1).unbind()  # 1-element index per parameter
            coeff = torch.where(steps + ok >= self.window, self.gain / self.window, 0.0).unbind()
            for g, st, at, c in zip(*zip(*group), positions, coeff):
                ring, total = st["ring"], st["sum"]
                old = ring.index_select(0, at).squeeze(0)
                if g.dtype == ring.dtype:
                    src = torch.where(bad, old, g, out=g)
                else:
                    src = torch.where(bad, old, g.to(ring.dtype))
                total.sub_(old.sub_(src))  # sum -= old - g: the difference rounded at its own (small) magnitude
                ring.index_copy_(0, at, src.unsqueeze(0))
                if id(st) in due:
                    torch.where(bad, total, ring.sum(dim=0), out=total)
                g.addcmul_(total, c)
            torch._foreach_add_([st["step"] for _, st in group], other=ok)  # not the Scalar overload: no .item()

    def _step_compiled(self, live: list[tuple[Tensor, Tensor]], found_inf: Tensor | None) -> None:
        sts = self._ensure_state(live)
        due = self._count_call(sts)
        # One graph serves both cases: without found_inf it gets a constant 0.  (The graph traced for
        # found_inf=None wrote the ring out of place: inductor copied all W slots every step.)
        found = found_inf if found_inf is not None else torch.zeros((), device=live[0][1].device)
        # Ring positions are computed outside the graph: inside, the remainder was recomputed for
        # every vector of every tensor and made the CPU kernel 1.7x slower.
        positions = [torch.remainder(st["step"], self.window).view(1) for st in sts]
        # Rare: re-sum after the fused step; if the step was skipped the saved sum is selected back.
        keep = [st["sum"].clone() for st in due]
        self._fused([st["ring"] for st in sts], [st["sum"] for st in sts], [g for _, g in live],
                    [st["step"] for st in sts], positions, found, *self._kernel_scalars(live[0][1].device))
        for old_sum, st in zip(keep, due):
            exact = st["ring"].sum(dim=0)
            torch.where(found.to(exact.device) != 0, old_sum, exact, out=st["sum"])

    def _kernel_values(self) -> tuple[int, float]:
        return (self.window, self.gain / self.window)

    @staticmethod
    def _kernel(rings: list[Tensor], sums: list[Tensor], grads: list[Tensor], steps: list[Tensor],
                positions: list[Tensor], found_inf: Tensor, window: Tensor, scale: Tensor) -> None:
        """One fused pass per tensor: read g, sum and ring[pos]; write them back."""
        ok = found_inf == 0
        for ring, total, g, step, pos in zip(rings, sums, grads, steps, positions):
            old = ring.index_select(0, pos).squeeze(0)  # a tensor index: no data-dependent shapes
            src = torch.where(ok, g.to(total.dtype), old)
            new_total = torch.where(ok, total - (old - src), total)
            ring.index_put_((pos,), src.unsqueeze(0))
            total.copy_(new_total)
            step.add_(ok.to(step.dtype))
            wide = torch.promote_types(g.dtype, total.dtype)
            coeff = torch.where(step >= window, scale, 0.0)  # scale = gain / window
            g.copy_(g.to(wide) + coeff * new_total.to(wide))

    def _signal(self, st: dict) -> tuple[Tensor, float, Tensor]:
        return st["sum"].float() / self.window, self.gain, st["step"] >= self.window
