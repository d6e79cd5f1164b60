"""The numbers of `compare`: a run's statistic, the paired test of a configuration against its baseline, and the
Holm and Benjamini–Hochberg adjustments of a family of those tests' p-values.

A missing or non-finite value counts as the worst, and a diverged run gets the worst value where it stopped, so a
run that blew up never looks good. Only evaluations after training began count: the one at step 0 reads the
untrained model (the curves keep it). A span's bounds are widened by one optimizer step, since an evaluation falls
on the first step past its epoch. The paired test pairs runs by seed (docs/DESIGN.md, section 11).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from hlb_gpt import components
from hlb_gpt.compare.loading import after_training_began, last_epoch, run_rows
from hlb_gpt.records import Run
from hlb_gpt.units import PERPLEXITY_TOKENIZERS, bits_per_byte, perplexity

CONFIDENCE = 0.95
ALPHA = 0.05  # the level of the forest plot's decision, on the Holm-adjusted p-value

# ----------------------------------------------------------------------------------------------- choices


@dataclass(frozen=True)
class Derived:
    """How a unit column comes from the loss in a row of a run recorded before the column existed: only for the
    tokenizers it is defined for without the text (GPT-2 bits per byte need the byte count of what was evaluated,
    which old rows do not hold)."""

    loss: str
    tokenizers: tuple[str, ...]
    convert: Callable[[float], float]


@dataclass(frozen=True)
class Column:
    """A column that can be compared, and which direction is better: a metrics.jsonl column, or (`at_end`) a
    value summary.json records once, at the end of a run, which counts as that run's one evaluation."""

    name: str
    lower_is_better: bool = True
    at_end: bool = False
    derived: Derived | None = field(default=None, compare=False)

    @property
    def worst(self) -> float:
        return math.inf if self.lower_is_better else -math.inf


# Adding a column here is all `compare` needs.
COLUMNS: dict[str, Column] = {
    "val_loss": Column("val_loss"),
    "train_loss": Column("train_loss"),
    "val_acc": Column("val_acc", lower_is_better=False),  # --task modular
    "train_acc": Column("train_acc", lower_is_better=False),
    "val_ppl": Column("val_ppl", derived=Derived("val_loss", PERPLEXITY_TOKENIZERS, perplexity)),
    "val_bpb": Column("val_bpb", derived=Derived("val_loss", ("bytes",), lambda loss: bits_per_byte(loss, 1, 1))),
    "test_loss": Column("test_loss", at_end=True),  # --eval-test
    "test_ppl": Column("test_ppl", at_end=True),
    "test_bpb": Column("test_bpb", at_end=True),
}
COLUMN_OWNERS = ("language-model runs record val_loss and train_loss, val_ppl with GPT-2 tokens and val_bpb; "
                 "test_loss, test_ppl and test_bpb with --eval-test; val_acc and train_acc are --task modular's")
# The column `steps_to_target` reads: the run reached its --target-acc at its first evaluation at or above it.
TARGET_COLUMN = "val_acc"
# The column `steps_to:X` and `time_to:X` read: a run reaches X at its first evaluation at or below it, as a run
# with --target-loss X stops there.
LOSS_COLUMN = "val_loss"
# The metrics of when a run reached a target, not of the values of its column: lower (sooner) is better.
TO_TARGET = ("steps_to_target", "steps_to", "time_to")


@dataclass(frozen=True)
class Metric:
    """The per-run statistic: `final`, `best`, `best` with `n` (mean of the n best), `mean`,
    `steps_to_target` (the step at which val_acc first reached the run's --target-acc), or `steps_to` and
    `time_to` with a `target` loss X (the step, the training seconds, at which val_loss first reached X)."""

    kind: str
    n: int | None = None
    target: float | None = None

    def __str__(self) -> str:
        if self.target is not None:
            return f"{self.kind}:{self.target:g}"
        return f"{self.kind}:{self.n}" if self.n is not None else self.kind

    @property
    def to_target(self) -> bool:
        """Whether the statistic is when a run reached a target (a step, seconds), read from the whole run."""
        return self.kind in TO_TARGET

    def lower_is_better(self, column: Column) -> bool:
        return self.to_target or column.lower_is_better

    @property
    def spec(self) -> str:
        """How its values print: steps are whole numbers (means to a tenth), seconds to a hundredth, losses and
        accuracies to 4 places."""
        return {"steps_to_target": ".1f", "steps_to": ".1f", "time_to": ".2f"}.get(self.kind, ".4f")

    def describe(self, column: Column) -> str:
        if self.kind == "steps_to_target":
            return f"steps to {TARGET_COLUMN} >= the run's --target-acc"
        if self.kind == "steps_to":
            return f"steps to {LOSS_COLUMN} <= {self.target:g}"
        if self.kind == "time_to":
            return f"training seconds to {LOSS_COLUMN} <= {self.target:g}"
        if self.n is not None:
            return f"mean of the {self.n} {'lowest' if column.lower_is_better else 'highest'} {column.name}"
        return f"{self.kind} {column.name}"


@dataclass(frozen=True)
class Span:
    """Which evaluations of a run count: all, the first `k` epochs or the last `k` epochs."""

    kind: str
    k: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.k:g}" if self.k is not None else self.kind

    def describe(self) -> str:
        return "all evaluations" if self.kind == "all" else f"{self.kind} {self.k:g} epochs"


def parse_metric(text: str) -> Metric:
    text = text.strip().lower()
    if text in ("final", "best", "mean", "steps_to_target"):
        return Metric(text)
    if text.startswith("best:"):
        n = text.partition(":")[2]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--metric best:N needs a whole number N >= 1 (got {text!r})")
        return Metric("best", int(n))
    kind, sep, target = text.partition(":")
    if kind in ("steps_to", "time_to") and sep:
        loss = _positive(target)
        if loss is None:
            raise ValueError(f"--metric {kind}:X needs a validation loss X > 0, e.g. {kind}:3.5 (got {text!r})")
        return Metric(kind, target=loss)
    raise ValueError(f"--metric must be final, best, best:N, mean, steps_to_target, steps_to:X or time_to:X "
                     f"(got {text!r})")


def _positive(text: str) -> float | None:
    """The number `text` spells if it is finite and above 0, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def parse_span(text: str) -> Span:
    text = text.strip().lower()
    if text == "all":
        return Span("all")
    kind, sep, k = text.partition(":")
    if kind in ("first", "last") and sep:
        value = _positive(k)
        if value is None:
            raise ValueError(f"--span {kind}:K needs a number of epochs K > 0 (got {text!r})")
        return Span(kind, value)
    raise ValueError(f"--span must be all, first:K or last:K with K in epochs (got {text!r})")


def parse_column(text: str) -> Column:
    if text not in COLUMNS:
        raise ValueError(f"--column must be one of {', '.join(COLUMNS)} (got {text!r})")
    return COLUMNS[text]


def parse_choices(metric: Metric | str, span: Span | str,
                  column: Column | str | None = None) -> tuple[Metric, Span, Column]:
    """The three choices of a comparison, checked together. The column defaults to val_loss, or to val_acc
    for steps_to_target (whose value is a step count; the column is what its curves show)."""
    metric = parse_metric(metric) if isinstance(metric, str) else metric
    span = parse_span(span) if isinstance(span, str) else span
    if column is None:
        column = TARGET_COLUMN if metric.kind == "steps_to_target" else "val_loss"
    column = parse_column(column) if isinstance(column, str) else column
    if metric.to_target and span.kind != "all":
        raise ValueError(f"--metric {metric} reads the whole run: drop --span {span}")
    return metric, span, column


# ----------------------------------------------------------------------------------------------- per run


@dataclass
class Series:
    """One run's evaluations of one column: epochs ascending, bad values replaced by the worst value."""

    epochs: np.ndarray
    values: np.ndarray
    epochs_per_step: float


def column_rows(run: Run, column: Column) -> list[dict[str, Any]]:
    """The run's rows (`run_rows`) as `column` reads them. A unit column a row lacks is computed from its loss where
    the run's tokenizer allows (a run recorded before the column existed); an `at_end` column is one row, at the
    run's last epoch, holding the summary's value (none when the summary has none)."""
    rows = run_rows(run)
    if column.at_end:
        value = (run.summary or {}).get(column.name, _MISSING)
        if value is _MISSING:
            return []
        last = rows[-1] if rows else {}
        return [{"epoch": last_epoch(run), "step": (run.summary or {}).get("steps", last.get("step")),
                 column.name: value}]
    derived = column.derived
    if derived is None or not _derivable(run, derived):
        return rows
    return [row if column.name in row or derived.loss not in row
            else {**row, column.name: _convert(derived, row[derived.loss])} for row in rows]


_MISSING = object()


def _derivable(run: Run, derived: Derived) -> bool:
    config = run.config
    return components.task_of(config).holds_text and config.get("tokenizer", "gpt2") in derived.tokenizers


def _convert(derived: Derived, loss: Any) -> float | None:
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return derived.convert(float(loss))
    return None  # a non-finite loss, written as null: the worst value, as the loss itself would be


def lacks_column(run: Run, column: Column) -> bool:
    """Whether the run never recorded `column`: it has evaluations but none records it (an LM run asked for
    val_acc), or, for an `at_end` column, its summary has no value and it is not a language-model run that
    diverged (which never reaches the end that evaluates the test split: it counts as the worst value, as it does
    for every column, whether or not it asked for --eval-test)."""
    if column.at_end:
        diverged_lm = run.status == "diverged" and components.task_of(run.config).holds_text
        return not column_rows(run, column) and not diverged_lm
    rows = column_rows(run, column)
    return bool(rows) and not any(column.name in r for r in rows)


def run_series(run: Run, column: Column) -> Series:
    """The run's evaluations after training began: the untrained model's loss is no run's best or final value."""
    rows = [r for r in column_rows(run, column) if after_training_began(r)]
    epochs = [float(r["epoch"]) for r in rows]
    values = [_value_or_worst(r.get(column.name), column) for r in rows]
    if run.status == "diverged" and not (values and math.isinf(values[-1])):
        epochs.append(last_epoch(run))
        values.append(column.worst)
    per_step = [r["epoch"] / r["step"] for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] > 0]
    return Series(np.asarray(epochs, dtype=float), np.asarray(values, dtype=float), max(per_step, default=0.0))


def _value_or_worst(value: Any, column: Column) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return column.worst


def steps_to_target(run: Run) -> float | None:
    """The step of the run's first evaluation after training began with val_acc >= its --target-acc; +inf if none
    reached it (within its budget, or before it diverged or stopped); None when the run has no target."""
    target = run.config.get("target_acc")
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        return None
    for row in filter(after_training_began, run_rows(run)):
        value, step = row.get(TARGET_COLUMN), row.get("step")
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= target and isinstance(step, int):
            return float(step)
    return math.inf


def to_loss(run: Run, metric: Metric) -> float:
    """For `steps_to:X` the step, for `time_to:X` the training seconds (`time_s`, the clock of the summary's
    `time_to_target_s`), of the run's first evaluation after training began with val_loss <= X; +inf if none
    reached it (within its budget, or before it diverged or stopped), as `steps_to_target` counts it."""
    field = "step" if metric.kind == "steps_to" else "time_s"
    for row in filter(after_training_began, run_rows(run)):
        loss, value = row.get(LOSS_COLUMN), row.get(field)
        if _is_number(loss) and loss <= metric.target and _is_number(value):
            return float(value)
    return math.inf


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def span_values(series: Series, span: Span) -> np.ndarray:
    """The values of the evaluations inside `span`, in epoch order."""
    if span.kind == "all" or len(series.epochs) == 0:
        return series.values
    slack = series.epochs_per_step + 1e-9  # the evaluation of epoch K is taken at the step that passes K
    if span.kind == "first":
        keep = series.epochs <= span.k + slack
    else:
        keep = series.epochs >= series.epochs.max() - span.k - slack
    return series.values[keep]


def run_statistic(values: np.ndarray, metric: Metric, column: Column) -> float:
    """The statistic of one run's values in the span (NaN for an empty span)."""
    if len(values) == 0:
        return math.nan
    if metric.kind == "final":
        return float(values[-1])
    ranked = np.sort(values) if column.lower_is_better else -np.sort(-values)
    if metric.kind == "best":
        return float(ranked[: metric.n or 1].mean())
    if metric.kind == "mean":
        return float(values.mean())
    raise ValueError(f"unknown metric {metric}")


# ----------------------------------------------------------------------------------------------- per configuration


def describe(values: Sequence[float]) -> tuple[int, float | None, float | None]:
    """n, mean and sample std (None below 2 values, or when one is infinite)."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    mean = float(array.mean()) if n else None
    std = float(array.std(ddof=1)) if n >= 2 and np.isfinite(array).all() else None
    return n, mean, std


def per_seed(seeds: Sequence[Any], values: Sequence[float]) -> dict[Any, float]:
    """The mean value of each seed (runs without a seed have no pair)."""
    by_seed: dict[Any, list[float]] = {}
    for seed, value in zip(seeds, values):
        if seed is not None:
            by_seed.setdefault(seed, []).append(value)
    return {seed: float(np.mean(v)) for seed, v in by_seed.items()}


def holm_adjusted(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error): the i-th smallest p times (m - i + 1), never below the
    one before it, at most 1; in the order given. scipy.stats has no Holm (1.17)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * np.arange(len(p), 0, -1))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def bh_adjusted(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg q-values (false discovery rate), in the order given."""
    p = np.asarray(p_values, dtype=float)
    return stats.false_discovery_control(p, method="bh") if len(p) else p


@dataclass
class PairedTest:
    """Config minus baseline over shared seeds. Fields are None where undefined; `reason` says why."""

    n_pairs: int
    seeds: tuple[Any, ...]
    mean_diff: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    statistic: float | None = None
    p_value: float | None = None
    p_holm: float | None = None   # p_value adjusted within its family (`comparison.families`)
    q_bh: float | None = None
    reason: str | None = None


def paired_test(mine: dict[Any, float], theirs: dict[Any, float]) -> PairedTest:
    """Config minus baseline over the seeds both have (`per_seed` of each): mean difference, 95% t interval,
    ttest_rel p-value. The adjusted p-values are set by `compare`, which knows the family."""
    seeds = tuple(sorted(set(mine) & set(theirs), key=str))
    x = np.array([mine[s] for s in seeds], dtype=float)
    y = np.array([theirs[s] for s in seeds], dtype=float)
    test = PairedTest(len(seeds), seeds)
    with np.errstate(invalid="ignore"):  # inf - inf is nan: caught below as "infinite"
        d = x - y
    reasons = []
    if len(seeds) < max(len(mine), len(theirs)):
        reasons.append(f"paired over {len(seeds)} shared seed(s) (it has {len(mine)}, the baseline {len(theirs)})")
    if not seeds:
        reasons.append("no difference or test without a shared seed")
    elif not np.isfinite(d).all():
        reasons.append("an infinite statistic (a diverged run, or a target never reached) makes a paired "
                       "difference infinite: no test")
    elif len(seeds) == 1:
        test.mean_diff = float(d[0])
        reasons.append("1 pair: the difference only, no interval or test")
    else:
        mean = float(d.mean())
        test.mean_diff = mean
        if np.ptp(d) <= 1e-12 * np.abs(d).max():
            test.ci_low = test.ci_high = mean
            reasons.append(f"all {len(d)} paired differences are identical ({mean:+.6g}): "
                           "no spread, so no p-value (the t statistic is undefined)")
        else:
            with warnings.catch_warnings():  # scipy warns on nearly identical data; the numbers are still right
                warnings.simplefilter("ignore", RuntimeWarning)
                result = stats.ttest_rel(x, y)
                interval = result.confidence_interval(CONFIDENCE)
            test.ci_low, test.ci_high = float(interval.low), float(interval.high)
            test.statistic, test.p_value = float(result.statistic), float(result.pvalue)
    test.reason = "; ".join(reasons) or None
    return test
