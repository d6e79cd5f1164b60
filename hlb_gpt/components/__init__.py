"""The registered components of a run: its task, its gradient filter and its optimizer.

A component declares in one place which settings it reads, how it is checked and built, its state's memory, its
part of the run-folder name and of compare's label, and its plain counterpart (the baseline `--baseline` adds).
A task (`tasks.py`) declares its presets, its refusals and what its runs support. Everything outside `filters.py`,
`optimizers.py` and `tasks.py` asks this registry, never a component's name. A new one is a `Task`, `Filter` or
`Optimizer` passed to `register`, from any module (tests register a sign filter and SGD this way).
`hlb_gpt.config` reads the defaults and help of --task, --filter and --optimizer here: these modules import it only
where they use it.
"""

from __future__ import annotations

from typing import Any, Mapping

from hlb_gpt.components import filters, optimizers, tasks
from hlb_gpt.components.filters import FILTERS, Filter
from hlb_gpt.components.optimizers import OPTIMIZERS, Optimizer
from hlb_gpt.components.tasks import TASKS, Task

__all__ = ["FILTERS", "OPTIMIZERS", "TASKS", "Filter", "Optimizer", "Task", "register", "filter_of", "optimizer_of",
           "task_of", "kind_of",
           "unused_settings", "identity_settings", "folder_part", "label", "plain_counterpart"]

# The settings of the filter itself whatever its kind; each component names the others it reads.
FILTER_COMMON = ("filter", "filter_dtype")


def register(component: Task | Filter | Optimizer) -> None:
    """Make `component` a choice of --task, --filter or --optimizer (a later one of the same name replaces it)."""
    registry = TASKS if isinstance(component, Task) else FILTERS if isinstance(component, Filter) else OPTIMIZERS
    registry[component.name] = component  # type: ignore[index]


def task_of(settings: Mapping[str, Any]) -> Task:
    """The task of settings, as `optimizer_of`; an unregistered one supports nothing."""
    name = settings.get("task") or tasks.DEFAULT
    return TASKS.get(name) or Task(name, _unregistered, preset="")


def optimizer_of(settings: Mapping[str, Any]) -> Optimizer:
    """The optimizer of a RunConfig's or a recorded config.json's settings (a missing key: the default). Records of
    one this process has not registered still read: by its name, as its own plain counterpart."""
    name = settings.get("optimizer") or optimizers.DEFAULT
    return OPTIMIZERS.get(name) or Optimizer(name, _unregistered, plain=name)


def filter_of(settings: Mapping[str, Any]) -> Filter:
    """The filter of settings, as `optimizer_of`; an unregistered one is known by its name alone."""
    name = settings.get("filter") or filters.DEFAULT
    return FILTERS.get(name) or Filter(name, tuple(component_settings()), (), _unregistered, lambda cfg: 0)


def _unregistered(*args: Any) -> Any:
    raise AssertionError("an unregistered component is never built: RunConfig refuses its name")


def kind_of(settings: Mapping[str, Any]) -> str:
    """`baseline` (no filter), the filter's name, or the name of an optimizer that filters itself."""
    optimizer = optimizer_of(settings)
    if optimizer.filters:
        return optimizer.name
    return filter_of(settings).name if settings.get("grokfast") else "baseline"


def _labelled(settings: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, str, str], ...]] | None:
    """The filtering component's name and its (setting, folder prefix, label prefix) triples, or None."""
    optimizer = optimizer_of(settings)
    if optimizer.filters:
        return optimizer.name, optimizer.shown
    if settings.get("grokfast"):
        return filter_of(settings).name, filter_of(settings).shown
    return None


def _plain_prefix(settings: Mapping[str, Any]) -> list[str]:
    """A non-default, non-filtering optimizer names itself first: `muon-…`."""
    optimizer = optimizer_of(settings)
    return [] if optimizer.filters or optimizer.name == optimizers.DEFAULT else [optimizer.name]


def folder_part(settings: Mapping[str, Any]) -> str:
    """`baseline`, `ema-a0.9-g0.1`, `ma-w100-g5`, `grokadamw-a0.98-g2`, `muon`, `muon-ema-a0.9-g0.1`."""
    labelled = _labelled(settings)
    parts = _plain_prefix(settings)
    if labelled is not None:
        name, shown = labelled
        parts.append("-".join([name, *(f"{short}{_fmt(settings.get(key))}" for key, short, _ in shown)]))
    return "-".join(parts) or "baseline"


def label(settings: Mapping[str, Any], gain: bool = True) -> str:
    """`baseline`, `ema α0.9 g0.1`, `ma w100 g5`, `muon baseline`, `muon ema α0.9 g0.1` (without the gain if not
    `gain`)."""
    labelled = _labelled(settings)
    if labelled is None:
        return " ".join([*_plain_prefix(settings), "baseline"])
    name, shown = labelled
    return " ".join([*_plain_prefix(settings), name,
                     *(f"{mark}{_fmt(settings.get(key))}" for key, _, mark in shown if gain or key != "gain")])


def shape(settings: Mapping[str, Any]) -> tuple:
    """What a plot's dash tells apart: the kind and its first shown setting other than the gain."""
    labelled = _labelled(settings)
    shown = [key for key, _, _ in labelled[1] if key != "gain"] if labelled else []
    return (kind_of(settings), settings.get(shown[0]) if shown else None)


def plain_counterpart(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The changes that make `settings` its baseline: no filter, and the optimizer's plain counterpart (GrokAdamW's
    is AdamW, Muon's Muon: a filter's effect is measured on the optimizer it feeds)."""
    return {"grokfast": False, "optimizer": optimizer_of(settings).plain}


def owned_settings() -> set[str]:
    """The settings one optimizer alone owns (Muon's): unset (None) in runs of the others."""
    return {key for optimizer in OPTIMIZERS.values() for key in optimizer.defaults}


def arm_settings() -> set[str]:
    """The settings a run's folder part and label already name: its optimizer, its filter and what they show."""
    shown = {key for c in (*FILTERS.values(), *OPTIMIZERS.values()) for key, _, _ in c.shown}
    return {"optimizer", "filter"} | shown


def component_settings() -> set[str]:
    """Every setting some component owns: unused by a run whose components do not read it."""
    owned = set(FILTER_COMMON)
    for component in (*FILTERS.values(), *OPTIMIZERS.values()):
        owned |= set(component.settings)
    return owned


def unused_settings(settings: Mapping[str, Any]) -> set[str]:
    """The component settings this run does not read (compare does not split configurations on them)."""
    optimizer = optimizer_of(settings)
    used = set(optimizer.settings)
    if settings.get("grokfast") and not optimizer.filters:
        used |= set(FILTER_COMMON) | set(filter_of(settings).settings)
    return component_settings() - used


def identity_settings() -> set[str]:
    """The settings a short label already says, or that decide which label is used."""
    shown = {key for c in (*FILTERS.values(), *OPTIMIZERS.values()) for key, _, _ in c.shown}
    return {"grokfast", "optimizer", "filter"} | shown


def described(registry: Mapping[str, Task | Filter | Optimizer]) -> str:
    """`ema: exponential moving average; ma: …`: the help of --task, --filter or --optimizer, from the
    components."""
    return "; ".join(f"{c.name}: {c.help}" for c in registry.values() if c.help) + "."


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
