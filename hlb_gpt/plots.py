"""Plots of a comparison: curves per configuration, the statistic against the gain, and the forest plot.

matplotlib on the Agg canvas (never pyplot), imported only when plotting. Colour is the gain, line style the
alpha (or MA window), the baseline black and thick. See docs/DESIGN.md, section 11.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hlb_gpt.compare import Column, Comparison, Group, PairedTest, run_rows, short_label
from hlb_gpt.compare.statistics import ALPHA, CONFIDENCE, column_rows
from hlb_gpt import components
from hlb_gpt.config import ConfigError
from hlb_gpt.records import Run

# Colour says the gain, line style the alpha (or MA window); baselines are black and thicker. When two
# configurations would still look alike (another setting varies), a marker tells them apart.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = (None, "o", "s", "^", "D", "v", "x", "P")
BASELINE_COLOR, BASELINE_WIDTH, LINE_WIDTH = "black", 2.6, 1.4


@dataclass(frozen=True)
class LineStyle:
    color: str
    linestyle: str
    marker: str | None
    linewidth: float


def line_styles(groups: Sequence[Group]) -> dict[str, LineStyle]:
    """A distinct (colour, line style, marker) per configuration label."""
    filtered = [g for g in groups if not g.is_baseline]
    gains = sorted({g.config.get("gain") for g in filtered}, key=_order)
    shapes = sorted({_shape(g.config) for g in filtered}, key=lambda s: tuple(map(_order, s)))
    used: set[tuple[str, str, str | None]] = set()
    styles = {}
    for g in sorted(groups, key=lambda g: (not g.is_baseline, g.label)):
        if g.is_baseline:
            color, dash, width = BASELINE_COLOR, 0, BASELINE_WIDTH
        else:
            color = PALETTE[gains.index(g.config.get("gain")) % len(PALETTE)]
            dash, width = shapes.index(_shape(g.config)), LINE_WIDTH
        combo = _free_combo(color, dash, used, fixed_color=g.is_baseline)
        used.add(combo)
        styles[g.label] = LineStyle(combo[0], combo[1], combo[2], width)
    return styles


def _shape(config: dict[str, Any]) -> tuple:
    return components.shape(config)


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _free_combo(color: str, dash: int, used: set, fixed_color: bool) -> tuple[str, str, str | None]:
    colors = [color] + ([] if fixed_color else [c for c in PALETTE if c != color])
    for marker in MARKERS:
        for c in colors:
            for i in range(len(LINESTYLES)):
                combo = (c, LINESTYLES[(dash + i) % len(LINESTYLES)], marker)
                if combo not in used:
                    return combo
    raise ValueError("more configurations than distinct line styles")  # 320 combinations: not reached in practice


def mean_curve(runs: Sequence[Run], column: Column) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean, min and max over seeds at each evaluation step (finite values only)."""
    by_step: dict[Any, tuple[list[float], list[float]]] = {}
    for run in runs:
        for row in column_rows(run, column):
            value = row.get(column.name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                step = row.get("step")
                epochs, values = by_step.setdefault(step if step is not None else ("epoch", row["epoch"]), ([], []))
                epochs.append(float(row["epoch"]))
                values.append(float(value))
    points = sorted((np.mean(e), np.mean(v), np.min(v), np.max(v)) for e, v in by_step.values())
    if not points:
        return tuple(np.empty(0) for _ in range(4))  # type: ignore[return-value]
    return tuple(np.array(col) for col in zip(*points))  # type: ignore[return-value]


def curves_figure(comparison: Comparison, log_x: bool = False, zoom: float | None = None):
    """Value against epoch: one line per configuration (mean over seeds) with a min–max band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = comparison
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    FigureCanvasAgg(fig)  # headless: never touches pyplot or the user's backend
    ax = fig.add_subplot()
    styles = line_styles(c.groups)
    y_seen: list[np.ndarray] = []
    x_seen: list[np.ndarray] = []
    for g in c.groups:
        s = styles[g.label]
        x, mean, low, high = mean_curve(g.runs, c.column)
        x_seen.append(x)
        ax.plot(x, mean, label=f"{g.label} (n={len(g.runs)})", color=s.color, linestyle=s.linestyle,
                marker=s.marker, markevery=max(1, len(x) // 12), markersize=4, linewidth=s.linewidth,
                zorder=3 if g.is_baseline else 2)
        ax.fill_between(x, low, high, color=s.color, alpha=0.12 if g.is_baseline else 0.08, linewidth=0)
        keep = (x <= zoom) if zoom is not None else np.ones_like(x, dtype=bool)
        y_seen += [low[keep], high[keep]]
    scale = _log_axis(ax, np.concatenate(x_seen) if x_seen else np.empty(0)) if log_x else ""
    if zoom is not None:
        ys = np.concatenate(y_seen) if y_seen else np.empty(0)
        left = ax.get_xlim()[0] if log_x else 0.0
        ax.set_xlim(left, zoom)
        if ys.size:
            pad = 0.05 * (ys.max() - ys.min()) or 0.05 * abs(ys.max()) or 0.1
            ax.set_ylim(ys.min() - pad, ys.max() + pad)
    ax.set_xlabel("epoch" + scale)
    ax.set_ylabel(c.column.name)
    ax.set_title(f"{c.column.name} against epoch" + (f", first {zoom:g} epochs" if zoom is not None else "")
                 + ": mean over seeds, band min–max")
    ax.grid(True, alpha=0.3, which="both" if log_x else "major")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False,
              ncols=1 if len(c.groups) <= 24 else 2)
    return fig


def _log_axis(ax, epochs: np.ndarray) -> str:
    """A log epoch axis. The evaluation at epoch 0 (the untrained model) has no place on a log axis: matplotlib
    would put it at an invisible 1e-300 and draw the first segment as a flat line at the next value. So when a
    curve starts at 0 the axis is linear from 0 to the first later evaluation (symlog) and logarithmic after.
    Returns what the axis label adds to say so."""
    from matplotlib.ticker import FuncFormatter

    positive = epochs[epochs > 0]
    if positive.size and (epochs <= 0).any():
        linear_to = float(positive.min())
        ax.set_xscale("symlog", linthresh=linear_to, linscale=0.5)
        label = f" (linear to {linear_to:g}, log scale after)"
    else:
        ax.set_xscale("log")
        label = " (log scale)"
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # after the scale, which sets its own
    return label


def gain_figure(comparison: Comparison):
    """The statistic against gain, one line per alpha (or MA window), baselines as black horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    c = comparison
    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[str, list[Group]] = {}
    for g in c.groups:
        # A configuration whose mean is infinite (a run diverged, or never reached the target) has no point.
        if (not g.is_baseline and g.mean is not None and math.isfinite(g.mean)
                and isinstance(g.config.get("gain"), (int, float))):
            series.setdefault(_series_label(g), []).append(g)
    shapes = sorted({_shape(g.config) for v in series.values() for g in v}, key=lambda s: tuple(map(_order, s)))
    dashes = {shape: LINESTYLES[i % len(LINESTYLES)] for i, shape in enumerate(shapes)}
    for i, (label, members) in enumerate(sorted(series.items())):
        members.sort(key=lambda g: g.config["gain"])
        gains = [g.config["gain"] for g in members]
        means = [g.mean for g in members]
        errors = [g.std if g.std is not None else 0.0 for g in members]
        ax.errorbar(gains, means, yerr=errors, label=label, color=PALETTE[i % len(PALETTE)],
                    linestyle=dashes[_shape(members[0].config)], marker=MARKERS[1 + i % (len(MARKERS) - 1)],
                    capsize=3, linewidth=LINE_WIDTH)
    for g in c.groups:
        if g.is_baseline and g.mean is not None and math.isfinite(g.mean):
            ax.axhline(g.mean, color=BASELINE_COLOR, linewidth=BASELINE_WIDTH, label=f"{g.label} (mean)")
            if g.std is not None:
                ax.axhspan(g.mean - g.std, g.mean + g.std, color=BASELINE_COLOR, alpha=0.08, linewidth=0)
    gains = [g.config["gain"] for v in series.values() for g in v]
    if gains and min(gains) > 0:  # gains are chosen on a log grid (0.1, 0.5, 2, 5)
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(gains)), labels=[f"{v:g}" for v in sorted(set(gains))])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("gain")
    ax.set_ylabel(_statistic_name(c))
    ax.set_title(f"{c.metric.describe(c.column)}, {c.span.describe()}: mean ± std over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", frameon=False)
    return fig


def _statistic_name(c: Comparison) -> str:
    return str(c.metric) if c.metric.to_target else f"{c.metric} {c.column.name}"


def _series_label(g: Group) -> str:
    """A gain chart series: the configuration label without its gain."""
    return " ".join(filter(None, [short_label(g.config, gain=False), g.settings]))


def check_plot_dir(out_dir: Path) -> None:
    """Make the folder `--plot` names, and check that a file can be written in it; a one-line ConfigError if
    not (a file in the way, no permission, a read-only disk)."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--plot {out_dir}: {probe} is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--plot {out_dir}: cannot write there ({exc.strerror or exc})") from None


def plot(comparison: Comparison, out_dir: Path | str, log_x: bool = False, zoom: float | None = None) -> list[Path]:
    """Write the PNGs into `out_dir` and return their paths.

    `<column>_vs_epoch.png` always; `<column>_vs_epoch_first<K>.png` with `zoom`; `<column>_vs_gain.png`
    (`steps_to_target_vs_gain.png`, `steps_to_3.5_vs_gain.png`... for those metrics) when a filtered
    configuration has a finite statistic;
    `forest.png` when a configuration has a paired difference to its baseline.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = comparison.column.name
    figures = [(f"{name}_vs_epoch.png", curves_figure(comparison, log_x=log_x))]
    if zoom is not None:
        figures.append((f"{name}_vs_epoch_first{zoom:g}.png", curves_figure(comparison, log_x=log_x, zoom=zoom)))
    if any(not g.is_baseline and g.mean is not None and math.isfinite(g.mean) for g in comparison.groups):
        statistic = str(comparison.metric).replace(":", "_") if comparison.metric.to_target else name
        figures.append((f"{statistic}_vs_gain.png", gain_figure(comparison)))
    if has_paired_difference(comparison):
        figures.append(("forest.png", forest_figure(comparison)))
    paths = []
    for filename, fig in figures:
        fig.savefig(out_dir / filename, dpi=120)
        paths.append(out_dir / filename)
    return paths


# ----------------------------------------------------------------------------------------------- forest plot

# Significant after Holm's adjustment within the baseline's family, on the better or the worse side of 0; or
# neither (not significant, or no test). The raw interval alone would colour one null configuration in twenty.
BETTER_COLOR, WORSE_COLOR, UNCLEAR_COLOR = "#2ca02c", "#d62728", "#555555"


def forest_rows(comparison: Comparison) -> list[Group]:
    """The configurations a forest plot shows: every one but the baselines, in the table's order (best first)."""
    return [g for g in comparison.groups if not g.is_baseline]


def has_paired_difference(comparison: Comparison) -> bool:
    return any(g.test is not None and g.test.mean_diff is not None for g in forest_rows(comparison))


def forest_figure(comparison: Comparison):
    """Each configuration's paired difference to its baseline with its 95% interval: "did it help beyond noise".

    One row per configuration, labelled and ordered as in the table, a vertical line at 0 and, on the right,
    the difference, its interval and "n = k pairs". A row with one pair has a point without an interval; a row
    with no difference (no baseline, no shared seed, or an infinite statistic) has no point and its text says why.
    The colour is the Holm-adjusted decision at ALPHA within the baseline's family (`comparison.families`):
    better or worse, or grey (not significant after adjustment, or no test), so an interval clear of 0 may be
    grey; a legend says so. The interval drawn is the unadjusted 95% t interval.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    c = comparison
    rows = forest_rows(c)
    lower_is_better = c.metric.lower_is_better(c.column)
    spec = c.metric.spec
    fig = Figure(figsize=(10, 2.2 + 0.45 * max(len(rows), 1)), layout="constrained")  # title, rows, legend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvline(0.0, color=BASELINE_COLOR, linewidth=1.0, zorder=1)
    # Several baselines (e.g. a depth grid): say which one each row is paired with.
    several = len({g.baseline for g in rows if g.baseline is not None}) > 1
    xs: list[float] = [0.0]
    for y, g in enumerate(rows):
        t = g.test
        if t is not None and t.mean_diff is not None and math.isfinite(t.mean_diff):
            d = t.mean_diff
            xerr = None if t.ci_low is None else [[d - t.ci_low], [t.ci_high - d]]
            ax.errorbar([d], [y], xerr=xerr, fmt="o", color=_forest_color(t, lower_is_better), capsize=4,
                        markersize=6, linewidth=1.6, label=g.label, zorder=3)
            xs += [d] + ([t.ci_low, t.ci_high] if t.ci_low is not None else [])
        ax.text(1.02, y, _forest_text(t, spec), transform=ax.get_yaxis_transform(), va="center", fontsize="small")
    ax.set_yticks(range(len(rows)), labels=[f"{g.label} vs {g.baseline}" if several and g.baseline else g.label
                                            for g in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the best configuration on top, as in the table
    low, high = min(xs), max(xs)
    pad = 0.08 * (high - low) or 0.1 * abs(high) or 0.1
    ax.set_xlim(low - pad, high + pad)
    better = "negative" if lower_is_better else "positive"
    ax.set_xlabel(f"{_statistic_name(c)}: configuration − baseline, paired over seeds ({better} is better)")
    ax.set_title(f"{c.metric.describe(c.column)}, {c.span.describe()}\n"  # short lines: one is wider than the axes
                 f"paired difference to the baseline: mean and {CONFIDENCE:.0%} t interval (unadjusted)\n"
                 f"colour: Holm-adjusted p < {ALPHA:g} within each baseline's family")
    ax.grid(True, axis="x", alpha=0.3)
    key = [Line2D([], [], color=BETTER_COLOR, marker="o", label=f"better: Holm-adjusted p < {ALPHA:g}"),
           Line2D([], [], color=WORSE_COLOR, marker="o", label=f"worse: Holm-adjusted p < {ALPHA:g}"),
           Line2D([], [], color=UNCLEAR_COLOR, marker="o", label="not significant after Holm, or no test")]
    fig.legend(handles=key, loc="outside lower center",
               ncols=3, fontsize="small", frameon=False)
    return fig


def _forest_color(t: PairedTest, lower_is_better: bool) -> str:
    if t.p_holm is None or not t.p_holm < ALPHA or not t.mean_diff:
        return UNCLEAR_COLOR
    helped = t.mean_diff < 0 if lower_is_better else t.mean_diff > 0
    return BETTER_COLOR if helped else WORSE_COLOR


def _forest_text(t: PairedTest | None, spec: str) -> str:
    """What the right margin says of a row: the difference, its interval and the pairs, or why there are none."""
    if t is None:
        return "no baseline"
    if t.n_pairs == 0:
        return "no pairs (no seed shared with the baseline)"
    pairs = f"n = {t.n_pairs} pair" + ("s" if t.n_pairs != 1 else "")
    if t.mean_diff is None or not math.isfinite(t.mean_diff):
        return f"{pairs}: infinite, no difference"
    if t.ci_low is None:
        return f"{t.mean_diff:+{spec}}   {pairs}: no interval"
    return f"{t.mean_diff:+{spec}} [{t.ci_low:+{spec}}, {t.ci_high:+{spec}}]   {pairs}"
