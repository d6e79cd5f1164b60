"""`compare()`: runs grouped into configurations, each with its statistic, its test against its baseline (its
p-value adjusted within its family) and its costs (filter state, step-time overhead), sorted best first, with a
note on everything that is not plain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from hlb_gpt.compare import configurations
from hlb_gpt.compare.loading import run_label, run_rows
from hlb_gpt.compare.statistics import (COLUMN_OWNERS, Column, Metric, PairedTest, Series, Span, bh_adjusted,
                                        describe, holm_adjusted, lacks_column, paired_test, parse_choices, per_seed,
                                        run_series, run_statistic, span_values, steps_to_target, to_loss)
from hlb_gpt import components
from hlb_gpt.records import Run
from hlb_gpt.resample import epoch_grid, resample_curve


@dataclass
class Group:
    """One configuration: its runs, their statistic, and the comparison with its baseline."""

    label: str
    config: dict[str, Any]
    runs: list[Run]
    settings: str = ""                                   # the other settings in the label, e.g. "depth=4"
    seeds: list[Any] = field(default_factory=list)     # of the runs that have a value, parallel to `values`
    values: list[float] = field(default_factory=list)
    is_baseline: bool = False
    baseline: str | None = None                          # label of the baseline group, if present
    n: int = 0
    mean: float | None = None
    std: float | None = None
    test: PairedTest | None = None                       # None for a baseline itself
    filter_mb: float | None = None
    filter_pct_of_peak: float | None = None
    step_time_overhead_pct: float | None = None


@dataclass
class Comparison:
    metric: Metric
    span: Span
    column: Column
    groups: list[Group]                                  # sorted, best first
    notes: list[str]

    def group(self, label: str) -> Group:
        for g in self.groups:
            if g.label == label:
                return g
        raise KeyError(f"no configuration labelled {label!r} (have {[g.label for g in self.groups]})")


def compare(runs: Sequence[Run], metric: Metric | str, span: Span | str, column: Column | str | None = None,
            notes: Sequence[str] = (), resample: int | None = None) -> Comparison:
    """Group `runs` by configuration, compute the statistic per run and configuration, test against baselines.

    `column` defaults as in `parse_choices`. `notes` (e.g. from `load_runs`) are kept at the front of the
    comparison's notes. `resample` N puts every curve on N epochs first (`hlb_gpt.resample`).
    """
    metric, span, column = parse_choices(metric, span, column)
    lower_is_better = metric.lower_is_better(column)
    notes = list(notes)
    grid = _resample_grid(runs, metric, column, resample, notes) if resample is not None else None
    groups, recorded, sources = _group(runs)

    short_spans, empty, no_target, lacking = [], [], [], []
    for g in groups.values():
        for run in g.runs:
            if metric.to_target:
                steps = steps_to_target(run) if metric.kind == "steps_to_target" else to_loss(run, metric)
                if steps is None:
                    no_target.append(run_label(run))
                else:
                    g.seeds.append(run.config.get("seed"))
                    g.values.append(steps)
                continue
            if lacks_column(run, column):  # not a diverged run: it never recorded this column at all
                lacking.append(run_label(run))
                continue
            series = run_series(run, column)
            if grid is not None:  # one set of epochs for every run, whatever its evaluation cadence
                epochs, resampled = resample_curve(series.epochs, series.values, grid, column.worst,
                                                   diverged=run.status == "diverged")
                series = Series(epochs, resampled, epochs_per_step=0.0)  # grid points are exact epochs: no slack
            values = span_values(series, span)
            if len(values) == 0:
                empty.append(run_label(run))
                continue
            if metric.n is not None and len(values) < metric.n:
                short_spans.append(len(values))
            g.seeds.append(run.config.get("seed"))
            g.values.append(run_statistic(values, metric, column))
        g.n, g.mean, g.std = describe(g.values)
        if len(set(g.seeds)) < len(g.seeds):
            notes.append(f"{g.label}: a seed appears more than once ({g.n} runs, {len(set(g.seeds))} seeds); "
                         "every run counts in n, mean and std, and the paired test uses each seed's mean")
    if empty:
        notes.append(f"no evaluations in span {span} for {len(empty)} run(s), left out: {', '.join(empty)}")
    if lacking:
        where = "in the summaries of" if column.at_end else "column in the metrics of"
        notes.append(f"no {column.name} {where} {len(lacking)} run(s), left out "
                     f"({COLUMN_OWNERS}): {', '.join(lacking)}")
    if no_target:
        notes.append(f"no --target-acc recorded for {len(no_target)} run(s), left out: {', '.join(no_target)}")
    if short_spans:
        notes.append(f"{metric}: {len(short_spans)} run(s) have fewer than {metric.n} evaluations in span "
                     f"{span} (fewest {min(short_spans)}); their statistic is the mean of all they have")

    missing: dict[str, list[str]] = {}  # by the optimizer of the baseline they lack
    for key, g in groups.items():
        base_config = configurations.baseline_config(recorded[key])
        base = groups.get(configurations.key_of(base_config))
        g.is_baseline = base is g
        g.baseline = base.label if base is not None else None
        if base is None:
            elsewhere = [f"{other.label} differs only in {why}" for other in groups.values()
                         if (why := configurations.environment_difference(base_config, other.config, sources))]
            if elsewhere:
                notes.append(f"{g.label}: no baseline with its data, device and precision ({'; '.join(elsewhere)}): "
                             "not paired")
            else:
                plain = components.OPTIMIZERS[components.plain_counterpart(g.config)["optimizer"]]
                missing.setdefault(plain.title or plain.name, []).append(g.label)
        elif not g.is_baseline:
            g.test = paired_test(per_seed(g.seeds, g.values), per_seed(base.seeds, base.values))
        _costs(g, base)
    for optimizer, labels in missing.items():
        notes.append(f"no baseline (the unfiltered {optimizer} run with the same other settings) for "
                     f"{', '.join(labels)}: the baseline difference, memory share and step-time columns are n/a")
    notes += _environment_notes(list(groups.values()), sources)

    ordered = sorted(groups.values(), key=lambda g: _sort_key(g, lower_is_better))
    for family in families(ordered).values():
        p_values = [g.test.p_value for g in family]
        for g, holm, bh in zip(family, holm_adjusted(p_values), bh_adjusted(p_values)):
            g.test.p_holm, g.test.q_bh = float(holm), float(bh)
    notes += _test_notes(ordered) + _tie_notes(ordered) + _infinite_notes(ordered, metric, lower_is_better)
    return Comparison(metric, span, column, ordered, notes)


def families(groups: Sequence[Group]) -> dict[str, list[Group]]:
    """The tests whose p-values are adjusted together, by baseline label: the configurations paired with one
    baseline that have a p-value (one compare call, so one metric, span and column). A configuration without a
    p-value (fewer than 2 pairs, an infinite or a constant difference) is no test, so not in the family."""
    out: dict[str, list[Group]] = {}
    for g in groups:
        if g.test is not None and g.test.p_value is not None and g.baseline is not None:
            out.setdefault(g.baseline, []).append(g)
    return out


def _resample_grid(runs: Sequence[Run], metric: Metric, column: Column, n: int, notes: list[str]) -> np.ndarray:
    """The common epoch grid of `--resample n`, with a note saying so."""
    if metric.to_target:
        raise ValueError(f"--resample does not apply to --metric {metric} (the step or time of an evaluation)")
    if column.at_end:
        raise ValueError(f"--resample does not apply to --column {column.name} (one value, at the end of a run)")
    ends = [(s.epochs[-1], run.status == "diverged") for run in runs
            if not lacks_column(run, column) and (s := run_series(run, column)).epochs.size]
    grid = epoch_grid((end for end, _ in ends), n)
    shorter = sum(1 for end, diverged in ends if end < grid[-1] and not diverged)  # a diverged run keeps its points
    notes.append(f"curves resampled onto {n} epoch points 0..{grid[-1]:g}"
                 + (f"; {shorter} run(s) end earlier and have fewer points" if shorter else ""))
    return grid


def _group(runs: Sequence[Run]) -> tuple[dict[configurations.Key, Group], dict[configurations.Key, dict[str, Any]],
                                         dict[str, str]]:
    """The configurations of `runs` by key, each configuration's first recorded config (its data sha filled in),
    and where each data sha was read (`configurations.data_sources`)."""
    keyed: dict[configurations.Key, list[Run]] = {}
    recorded: dict[configurations.Key, dict[str, Any]] = {}
    for run, config in zip(runs, configurations.with_data_hashes([run.config for run in runs])):
        key = configurations.group_key(config)
        keyed.setdefault(key, []).append(run)
        recorded.setdefault(key, config)
    normalised = {key: configurations.normalise_config(config) for key, config in recorded.items()}
    labels = configurations.labels(normalised)
    groups = {key: Group(labels[key][0], normalised[key], members, settings=labels[key][1])
              for key, members in keyed.items()}
    return groups, recorded, configurations.data_sources(list(recorded.values()))


def _environment_notes(groups: list[Group], sources: dict[str, str]) -> list[str]:
    """One note per pair of configurations that differ only in data, device, precision, compile or world size."""
    notes = []
    groups = sorted(groups, key=lambda g: g.label)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            why = configurations.environment_difference(a.config, b.config, sources)
            if why:
                notes.append(f"{a.label} and {b.label} differ only in {why}: listed apart, never pooled or paired")
    return notes


def _mean_of(runs: list[Run], *keys: str) -> float | None:
    values = []
    for run in runs:
        node: Any = run.summary or {}
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            values.append(float(node))
    return float(np.mean(values)) if values else None


def _costs(g: Group, base: Group | None) -> None:
    """Filter state (MB, % of the baseline's peak) and step-time overhead, from the runs' summaries."""
    filter_bytes = _mean_of(g.runs, "memory", "filter_bytes")
    if components.optimizer_of(g.config).filters:  # its EMA sits in the optimizer state, not in a filter
        own = _mean_of(g.runs, "memory", "optimizer_bytes")
        ref = _mean_of(base.runs, "memory", "optimizer_bytes") if base else None
        filter_bytes = None if own is None or ref is None else (filter_bytes or 0.0) + own - ref
    g.filter_mb = None if filter_bytes is None else filter_bytes / 2**20
    if base is None:
        return
    peak = _mean_of(base.runs, "memory", "peak_bytes")
    if filter_bytes is not None and peak:
        g.filter_pct_of_peak = filter_bytes / peak * 100
    step, ref_step = _mean_of(g.runs, "step_time_s"), _mean_of(base.runs, "step_time_s")
    if step is not None and ref_step:
        g.step_time_overhead_pct = (step / ref_step - 1) * 100


def _sort_key(g: Group, lower_is_better: bool) -> tuple:
    if g.mean is None:
        return (1, 0.0, not g.is_baseline, g.label)
    return (0, g.mean if lower_is_better else -g.mean, not g.is_baseline, g.label)


def _test_notes(groups: list[Group]) -> list[str]:
    return [f"{g.label}: {g.test.reason}" for g in groups if g.test is not None and g.test.reason]


def _tie_notes(groups: list[Group]) -> list[str]:
    notes, i = [], 0
    while i < len(groups):
        j = i + 1
        while (j < len(groups) and groups[i].mean is not None and groups[j].mean is not None
               and math.isclose(groups[i].mean, groups[j].mean, rel_tol=1e-12)):
            j += 1
        if j - i > 1:
            tied = ", ".join(g.label for g in groups[i:j])
            notes.append(f"tie on the mean ({groups[i].mean:.6g}): {tied}; listed baseline first, then by label")
        i = j
    return notes


def _infinite_notes(groups: list[Group], metric: Metric, lower_is_better: bool) -> list[str]:
    notes = []
    for g in groups:
        bad = sum(1 for v in g.values if math.isinf(v))
        if not bad:
            continue
        if metric.to_target:
            longest = max((r.get("step", 0) for run in g.runs for r in run_rows(run)), default=0)
            why = f"never reached the target (the longest ran {longest:,} steps)"
        else:
            why = "diverged within the window"
        notes.append(f"{g.label}: {bad} of {g.n} run(s) {why}, so its mean is "
                     f"{'+' if lower_is_better else '-'}inf and its std n/a")
    return notes
