"""`hlb-gpt compare`: group runs by configuration, compare each with its unfiltered baseline, tabulate.

Reads run folders only through `hlb_gpt.records` (config.json, metrics.jsonl, summary.json). Needs numpy and
scipy; the figures are in `hlb_gpt.plots`. The rules, decided once here:

Loading (`load_runs`)
- A path is a run folder (it holds config.json) or a folder searched recursively for run folders (a sweep, or
  a folder of sweeps). The same run reached twice counts once.
- A run without summary.json (still running, or killed) is *included* with a note: its metrics rows are
  flushed one at a time, so the rows it has are valid, and a window such as `first:K` compares it fairly.
  Interrupted and failed runs with evaluations are included the same way. Their note names the epoch they
  reached, because `final` and `last:K` of a run that stopped early are not those of a finished one.
- A run with no evaluation is skipped with a note, except a diverged one (below).

Per-run statistic (`Metric` over `Window`, on one `Column`, by default `val_loss`)
- Rows are deduplicated by step (a resumed run may write a step twice; the later row wins), ordered by epoch.
- A missing or non-finite value counts as the worst possible (+inf for a lower-is-better column). A diverged
  run also gets a +inf row at the epoch where it stopped, so a run that blew up never looks good: its
  `final` and `mean` are +inf in any window that reaches that point, and `best:N` is +inf when fewer than N
  finite evaluations precede it. `best` stays the best value the run reached before diverging.
- Windows are measured on the run's own epochs: `first:K` keeps rows with epoch <= K, `last:K` rows with
  epoch >= (its last epoch) - K. Evaluations fall on the first optimizer step past their nominal epoch, so
  each bound is widened by one optimizer step (epoch / step of the run's rows): `first:1` keeps the
  evaluation taken at epoch 1.0004.
- `final` is the last value in the window, `best` the lowest, `best:N` the mean of the N lowest (all of them
  when the window holds fewer, with a note), `mean` the mean of all. For a higher-is-better column (val_acc,
  train_acc), "lowest" reads "highest" and +inf reads -inf.
- `steps_to_target` (the grokking benchmark) is the step of the first evaluation whose val_acc reached the
  run's --target-acc, whatever `--column`; a run that never reached it counts as +inf (lower is better), like
  a diverged one; a run without a target is left out with a note. It reads the whole run (no window).

Configurations
- The group key is the config without the seed, the software versions and the bookkeeping settings that do
  not change the experiment (`config.BOOKKEEPING`: checkpointing, logging, cache paths; the same list tells
  what a resumed run may change). Every other recorded difference separates configurations, including the
  length and the environment (`ENVIRONMENT_KEYS`), each taken as the run really had it:
  `data` (the sha256 of the training and validation text; for runs recorded before config.json held it, the
  sha of other runs that read the same dataset from the same --data-dir, else the dataset or the --data-dir),
  `device` (cpu, cuda, mps), `precision` (bf16 or fp32 as resolved), `compile` (`default` when the run did
  what its device does by default, on for CUDA only; else on or off) and `world_size`. Settings that a
  configuration does not use are dropped: all filter settings when the run is unfiltered (grokfast false,
  AdamW), `window` for EMA, `alpha` for MA, the GrokAdamW settings for Grokfast runs, and `filter`, `window`,
  `filter_dtype` for GrokAdamW. So two baselines whose configs carry different, unused alphas are the same
  configuration.
- Configurations that differ only in their environment are labelled apart (`device=cpu`, `data=173c87a5`),
  never pooled or paired, and a note says so.
- The baseline of a configuration is the unfiltered AdamW configuration equal in every other setting, the
  environment included: a filtered GPU run is never paired with a CPU baseline (a note names the baseline
  that differs only in its environment).
- Per configuration: n runs, mean, sample std (ddof=1; None below 2 runs; None when a run is infinite).
- Paired test against the baseline over the seeds both have (a seed run twice in one configuration counts
  with its mean): mean of (config - baseline), so negative means the filter helped a loss; a 95% interval
  from scipy's t distribution; the two-sided p-value of `scipy.stats.ttest_rel`. One pair gives the
  difference only; no pairs, an infinite statistic or identical differences (the t statistic is undefined)
  give None with a note.
- Filter state MB is the recorded `filter_bytes` / 2**20 (mean over runs); for GrokAdamW, whose filter lives
  in the optimizer state, it is the optimizer state in excess of the baseline's. Its share is of the
  baseline's mean `peak_bytes`. Step-time overhead is mean `step_time_s` / the baseline's - 1, in percent:
  the steady time per step, without the intervals in which torch.compile compiled (`compile_time_s`), so
  that the run of a sweep that paid for compilation is not made to look slower.
- Rows are sorted by the statistic's mean, best first; ties keep baselines first, then label order, and get
  a note. Configurations without a value sort last.

Output: `format_table` gives markdown (title, table, notes) or CSV (table only; `format_notes` gives the
notes, for stderr).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from hlb_gpt.config import BOOKKEEPING, RunConfig
from hlb_gpt.records import Run, is_run_dir, read_run
from hlb_gpt.resample import epoch_grid, resample_curve

CONFIDENCE = 0.95

# Never part of a configuration: the seed pairs runs, versions differ between machines, and the bookkeeping
# settings (defined once in config.py, with resume) do not change what is measured.
# The attention kernel computes the same function (to float rounding), as --device and --compile do.
IRRELEVANT_KEYS = BOOKKEEPING | {"seed", "versions", "data_source", "checkpoint_cadence", "attention",
                                  "resolved_attention"}
# What a run ran on and how, as it really had it; each is a separate configuration (and a note).
ENVIRONMENT_KEYS = ("data", "device", "precision", "compile", "world_size")
# The recorded fields the environment is read from; the key holds the resolved values instead.
_ENVIRONMENT_SOURCES = frozenset({"text_sha256", "dataset", "data_dir", "device", "resolved_device", "precision",
                                  "resolved_precision", "compile", "world_size"})
FILTER_SETTINGS = ("filter", "alpha", "gain", "window", "filter_dtype", "grok_kappa", "grok_gamma")
# Settings the short label already says (or that decide which label is used).
IDENTITY_KEYS = frozenset({"grokfast", "optimizer", "filter", "alpha", "gain", "window"})


# ----------------------------------------------------------------------------------------------- choices


@dataclass(frozen=True)
class Column:
    """A metrics.jsonl column that can be compared, and which direction is better."""

    name: str
    lower_is_better: bool = True

    @property
    def worst(self) -> float:
        return math.inf if self.lower_is_better else -math.inf


# Adding a column here is all `compare` needs.
COLUMNS: dict[str, Column] = {
    "val_loss": Column("val_loss"),
    "train_loss": Column("train_loss"),
    "val_acc": Column("val_acc", lower_is_better=False),  # --task modular
    "train_acc": Column("train_acc", lower_is_better=False),
}
COLUMN_OWNERS = "language-model runs record val_loss and train_loss; val_acc and train_acc are --task modular's"
# The column `steps_to_target` reads: the run reached its --target-acc at its first evaluation at or above it.
TARGET_COLUMN = "val_acc"


@dataclass(frozen=True)
class Metric:
    """The per-run statistic: `final`, `best`, `best` with `n` (mean of the n best), `mean`, or
    `steps_to_target` (the step at which val_acc first reached the run's --target-acc)."""

    kind: str
    n: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.n}" if self.n is not None else self.kind

    def lower_is_better(self, column: Column) -> bool:
        return self.kind == "steps_to_target" or column.lower_is_better

    @property
    def spec(self) -> str:
        """How its values print: steps are whole numbers (means to a tenth), losses and accuracies to 4 places."""
        return ".1f" if self.kind == "steps_to_target" else ".4f"

    def describe(self, column: Column) -> str:
        if self.kind == "steps_to_target":
            return f"steps to {TARGET_COLUMN} >= the run's --target-acc"
        if self.n is not None:
            return f"mean of the {self.n} {'lowest' if column.lower_is_better else 'highest'} {column.name}"
        return f"{self.kind} {column.name}"


@dataclass(frozen=True)
class Window:
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
    raise ValueError(f"--metric must be final, best, best:N, mean or steps_to_target (got {text!r})")


def parse_window(text: str) -> Window:
    text = text.strip().lower()
    if text == "all":
        return Window("all")
    kind, sep, k = text.partition(":")
    if kind in ("first", "last") and sep:
        try:
            value = float(k)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--window {kind}:K needs a number of epochs K > 0 (got {text!r})")
        return Window(kind, value)
    raise ValueError(f"--window must be all, first:K or last:K with K in epochs (got {text!r})")


def parse_column(text: str) -> Column:
    if text not in COLUMNS:
        raise ValueError(f"--column must be one of {', '.join(COLUMNS)} (got {text!r})")
    return COLUMNS[text]


def parse_choices(metric: Metric | str, window: Window | str,
                  column: Column | str | None = None) -> tuple[Metric, Window, Column]:
    """The three choices of a comparison, checked together. The column defaults to val_loss, or to val_acc
    for steps_to_target (whose value is a step count; the column is what its curves show)."""
    metric = parse_metric(metric) if isinstance(metric, str) else metric
    window = parse_window(window) if isinstance(window, str) else window
    if column is None:
        column = TARGET_COLUMN if metric.kind == "steps_to_target" else "val_loss"
    column = parse_column(column) if isinstance(column, str) else column
    if metric.kind == "steps_to_target" and window.kind != "all":
        raise ValueError(f"--metric steps_to_target reads the whole run: drop --window {window}")
    return metric, window, column


# ----------------------------------------------------------------------------------------------- loading


def load_runs(paths: Sequence[Path | str]) -> tuple[list[Run], list[str]]:
    """The runs under `paths` (run folders, sweep folders or folders of sweeps) and notes on what was skipped."""
    notes: list[str] = []
    dirs: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            notes.append(f"{path}: no such folder, skipped")
            continue
        found = [path] if is_run_dir(path) else sorted(p.parent for p in path.rglob("config.json"))
        if not found:
            notes.append(f"{path}: no run folders (with config.json) found")
        for run_dir in found:
            if run_dir.resolve() not in seen:
                seen.add(run_dir.resolve())
                dirs.append(run_dir)
    runs = []
    for run_dir in dirs:
        try:
            run = read_run(run_dir)
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            notes.append(f"{run_name(run_dir)}: unreadable ({type(exc).__name__}: {exc}), skipped")
            continue
        if not isinstance(run.config, dict):
            notes.append(f"{run_name(run_dir)}: config.json is not an object, skipped")
            continue
        notes += run.problems  # damaged metrics lines: the rows around them are used
        keep, note = _status(run)
        if keep:
            runs.append(run)
        if note:
            notes.append(note)
    return runs, notes


def run_name(run: Run | Path) -> str:
    """`<sweep>/<run>`: sweeps name runs alike (`baseline-s0`), so the sweep tells them apart."""
    path = run.path if isinstance(run, Run) else Path(run)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _status(run: Run) -> tuple[bool, str | None]:
    """Whether to keep the run, and a note on anything but a completed run."""
    name, rows = run_name(run), len(run.metrics)
    reached = _last_epoch(run)
    planned = run.config.get("epochs")
    of = f" of {planned:g}" if isinstance(planned, (int, float)) else ""
    if run.status == "completed":
        return True, None
    if run.status == "diverged":  # kept even without evaluations: leaving it out would flatter its configuration
        return True, f"{name}: diverged at epoch {reached:g}; it counts as the worst value (+inf loss) from there"
    if not rows:
        why = "no summary.json" if run.summary is None else f"{run.status}: {run.summary.get('error')}"
        return False, f"{name}: no evaluations yet ({why}), skipped"
    if run.summary is None:
        return True, (f"{name}: unfinished (no summary.json): included with its {rows} evaluations "
                      f"up to epoch {reached:g}{of}")
    return True, f"{name}: {run.status} at epoch {reached:g}{of}: included with its {rows} evaluations"


def _last_epoch(run: Run) -> float:
    epochs = [r["epoch"] for r in run_rows(run)]
    if run.summary and isinstance(run.summary.get("epochs"), (int, float)):
        epochs.append(run.summary["epochs"])
    return max(epochs, default=0.0)


# ----------------------------------------------------------------------------------------------- per run


@dataclass
class Series:
    """One run's evaluations of one column: epochs ascending, bad values replaced by the worst value."""

    epochs: np.ndarray
    values: np.ndarray
    epochs_per_step: float


def run_rows(run: Run) -> list[dict[str, Any]]:
    """Rows with an epoch, one per step (a resumed run may repeat a step: the later row wins), by epoch."""
    by_step: dict[Any, dict[str, Any]] = {}
    for row in run.metrics:
        if isinstance(row, dict) and isinstance(row.get("epoch"), (int, float)):
            step = row.get("step")
            by_step[step if step is not None else ("epoch", row["epoch"])] = row
    return sorted(by_step.values(), key=lambda r: r["epoch"])


def lacks_column(run: Run, column: Column) -> bool:
    """Whether the run has evaluations but none records `column` (an LM run asked for val_acc)."""
    rows = run_rows(run)
    return bool(rows) and not any(column.name in r for r in rows)


def run_series(run: Run, column: Column) -> Series:
    rows = run_rows(run)
    epochs = [float(r["epoch"]) for r in rows]
    values = [_value_or_worst(r.get(column.name), column) for r in rows]
    if run.status == "diverged" and not (values and math.isinf(values[-1])):
        epochs.append(_last_epoch(run))
        values.append(column.worst)
    per_step = [r["epoch"] / r["step"] for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] > 0]
    return Series(np.asarray(epochs, dtype=float), np.asarray(values, dtype=float), max(per_step, default=0.0))


def _value_or_worst(value: Any, column: Column) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return column.worst


def steps_to_target(run: Run) -> float | None:
    """The step of the run's first evaluation with val_acc >= its --target-acc; +inf if none reached it (within
    its budget, or before it diverged or stopped); None when the run has no target."""
    target = run.config.get("target_acc")
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        return None
    for row in run_rows(run):
        value, step = row.get(TARGET_COLUMN), row.get("step")
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= target and isinstance(step, int):
            return float(step)
    return math.inf


def window_values(series: Series, window: Window) -> np.ndarray:
    """The values of the evaluations inside `window`, in epoch order."""
    if window.kind == "all" or len(series.epochs) == 0:
        return series.values
    slack = series.epochs_per_step + 1e-9  # the evaluation of epoch K is taken at the step that passes K
    if window.kind == "first":
        keep = series.epochs <= window.k + slack
    else:
        keep = series.epochs >= series.epochs.max() - window.k - slack
    return series.values[keep]


def run_statistic(values: np.ndarray, metric: Metric, column: Column) -> float:
    """The statistic of one run's windowed values (NaN for an empty window)."""
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


# ----------------------------------------------------------------------------------------------- configurations


def group_key(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The configuration a run belongs to: every setting that changes the experiment, but the seed."""
    return _key(normalise_config(config))


def _key(normalised: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, _hashable(v)) for k, v in normalised.items()))


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without irrelevant keys and without settings this kind of run does not use, with its
    environment (`ENVIRONMENT_KEYS`) as the run had it."""
    cfg = {**_DEFAULTS, **config}  # runs recorded before a setting existed ran with its default
    drop = set(IRRELEVANT_KEYS) | _ENVIRONMENT_SOURCES
    if cfg.get("optimizer") == "grokadamw":
        drop |= {"filter", "window", "filter_dtype"}  # GrokAdamW filters with its own EMA in param dtype
    elif not cfg.get("grokfast"):
        drop |= set(FILTER_SETTINGS)
    else:
        drop |= {"grok_kappa", "grok_gamma", "alpha" if cfg.get("filter") == "ma" else "window"}
    if isinstance(cfg.get("text_sha256"), dict):
        drop.add("train_tokens")  # the text and the tokenizer decide it
    return {**{k: v for k, v in cfg.items() if k not in drop}, **environment(cfg)}


def environment(config: dict[str, Any]) -> dict[str, Any]:
    """Data, device, precision, compile and world size as the run had them (`auto` resolved where recorded)."""
    device = str(config.get("resolved_device") or config.get("device") or "").split(":")[0]
    compile_ = config.get("compile")
    return {
        "data": data_id(config),
        "device": device,
        "precision": config.get("resolved_precision") or _old_precision(config, device),
        # As the device does by default (train() compiles on CUDA only), or not: --compile on CUDA is the default.
        "compile": "default" if compile_ is None or compile_ == (device == "cuda") else ("on" if compile_ else "off"),
        "world_size": config.get("world_size", 1),
    }


def _old_precision(config: dict[str, Any], device: str) -> Any:
    """What --precision auto meant for runs recorded before config.json held the resolved precision: bf16 for
    language models on CUDA, fp32 otherwise (the grokking task trains in fp32 unless asked)."""
    precision = config.get("precision")
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" and config.get("task", "lm") == "lm" else "fp32"


def data_id(config: dict[str, Any]) -> str:
    """The sha256 of the training and validation text, or, for runs recorded before config.json held it, where
    the text came from (the --data-dir, else the dataset)."""
    sha = config.get("text_sha256")
    if isinstance(sha, dict) and sha.get("train"):
        return f"sha256:{sha['train']}/{sha.get('valid')}"
    return str(config.get("data_dir") or config.get("dataset"))


def with_data_hashes(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configs, where one recorded without its data's sha256 takes the sha of the others read from the same
    place (dataset and --data-dir), when they all agree: old and new runs of one corpus stay one configuration."""
    seen: dict[str, set[Any]] = {}
    for cfg in configs:
        if isinstance(cfg.get("text_sha256"), dict):
            seen.setdefault(str(cfg.get("data_dir") or cfg.get("dataset")), set()).add(_hashable(cfg["text_sha256"]))
    out = []
    for cfg in configs:
        known = seen.get(str(cfg.get("data_dir") or cfg.get("dataset")), set())
        if "text_sha256" not in cfg and len(known) == 1:
            cfg = {**cfg, "text_sha256": dict(next(iter(known)))}
        out.append(cfg)
    return out


def environment_difference(a: dict[str, Any], b: dict[str, Any], sources: dict[str, str] | None = None) -> str | None:
    """`device (cpu vs cuda)` when normalised configs `a` and `b` differ only in their environment, else None.
    `sources` names where each data sha's text was read (`data_sources`)."""
    differ = {k for k in set(a) | set(b) if _hashable(a.get(k)) != _hashable(b.get(k))}
    if not differ or not differ <= {*ENVIRONMENT_KEYS, "train_tokens"}:  # runs recorded before the data sha
        return None

    def text(key: str, value: Any) -> str:
        where = (sources or {}).get(value) if key == "data" else None
        return f"{_format_value(key, value)} from {where}" if where else _format_value(key, value)

    return " and ".join(f"{k} ({text(k, a.get(k))} vs {text(k, b.get(k))})"
                        for k in (*ENVIRONMENT_KEYS, "train_tokens") if k in differ)


def data_sources(configs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each data sha's source as the first run that read it recorded it: its --data-dir, else its dataset."""
    sources: dict[str, str] = {}
    for cfg in configs:
        if isinstance(cfg.get("text_sha256"), dict):
            sources.setdefault(data_id(cfg), str(cfg.get("data_dir") or cfg.get("dataset")))
    return sources


def baseline_config(config: dict[str, Any]) -> dict[str, Any]:
    """The normalised config of the unfiltered AdamW configuration equal to `config` in every other setting."""
    return normalise_config({**config, "grokfast": False, "optimizer": "adamw"})


_DEFAULTS = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING and f.default is not None}


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def short_label(config: dict[str, Any], gain: bool = True) -> str:
    """`baseline`, `ema α0.9 g0.1`, `ma w100 g5` or `grokadamw α0.98 g2` (without ` g…` if not `gain`)."""
    if not config.get("grokfast") and config.get("optimizer") != "grokadamw":
        return "baseline"
    if config.get("optimizer") == "grokadamw":
        label = f"grokadamw α{config.get('alpha'):g}"
    elif config.get("filter") == "ma":
        label = f"ma w{config.get('window')}"
    else:
        label = f"ema α{config.get('alpha'):g}"
    return f"{label} g{config.get('gain'):g}" if gain else label


def _format_setting(key: str, value: Any) -> str:
    return f"{key}={_format_value(key, value)}"


def _format_value(key: str, value: Any) -> str:
    if key == "data" and isinstance(value, str) and value.startswith("sha256:"):
        return value[len("sha256:"):][:8]  # the training text's; enough to tell corpora apart in a label
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------- results


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
    reason: str | None = None


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
    window: Window
    column: Column
    groups: list[Group]                                  # sorted, best first
    notes: list[str]

    def group(self, label: str) -> Group:
        for g in self.groups:
            if g.label == label:
                return g
        raise KeyError(f"no configuration labelled {label!r} (have {[g.label for g in self.groups]})")


# ----------------------------------------------------------------------------------------------- compare


def compare(runs: Sequence[Run], metric: Metric | str, window: Window | str, column: Column | str | None = None,
            notes: Sequence[str] = (), resample: int | None = None) -> Comparison:
    """Group `runs` by configuration, compute the statistic per run and configuration, test against baselines.

    `column` defaults as in `parse_choices`. `notes` (e.g. from `load_runs`) are kept at the front of the
    comparison's notes. `resample` N puts every curve on N epochs first (`hlb_gpt.resample`).
    """
    metric, window, column = parse_choices(metric, window, column)
    lower_is_better = metric.lower_is_better(column)
    notes = list(notes)
    grid = _resample_grid(runs, metric, column, resample, notes) if resample is not None else None

    keyed: dict[tuple, list[Run]] = {}
    recorded: dict[tuple, dict[str, Any]] = {}  # each configuration's first config, its data sha filled in
    for run, config in zip(runs, with_data_hashes([run.config for run in runs])):
        key = group_key(config)
        keyed.setdefault(key, []).append(run)
        recorded.setdefault(key, config)
    configs = {key: normalise_config(config) for key, config in recorded.items()}
    sources = data_sources(list(recorded.values()))
    labels = _labels(configs)
    groups = {key: Group(labels[key][0], configs[key], members, settings=labels[key][1])
              for key, members in keyed.items()}

    short_windows, empty, no_target, lacking = [], [], [], []
    for g in groups.values():
        for run in g.runs:
            if metric.kind == "steps_to_target":
                steps = steps_to_target(run)
                if steps is None:
                    no_target.append(run_name(run))
                else:
                    g.seeds.append(run.config.get("seed"))
                    g.values.append(steps)
                continue
            if lacks_column(run, column):  # not a diverged run: it never recorded this column at all
                lacking.append(run_name(run))
                continue
            series = run_series(run, column)
            if grid is not None:  # one set of epochs for every run, whatever its evaluation cadence
                epochs, resampled = resample_curve(series.epochs, series.values, grid, column.worst,
                                                   diverged=run.status == "diverged")
                series = Series(epochs, resampled, epochs_per_step=0.0)  # grid points are exact epochs: no slack
            values = window_values(series, window)
            if len(values) == 0:
                empty.append(run_name(run))
                continue
            if metric.n is not None and len(values) < metric.n:
                short_windows.append(len(values))
            g.seeds.append(run.config.get("seed"))
            g.values.append(run_statistic(values, metric, column))
        _describe(g)
        if len(set(g.seeds)) < len(g.seeds):
            notes.append(f"{g.label}: a seed appears more than once ({g.n} runs, {len(set(g.seeds))} seeds); "
                         "every run counts in n, mean and std, and the paired test uses each seed's mean")
    if empty:
        notes.append(f"no evaluations in window {window} for {len(empty)} run(s), left out: {', '.join(empty)}")
    if lacking:
        notes.append(f"no {column.name} column in the metrics of {len(lacking)} run(s), left out "
                     f"({COLUMN_OWNERS}): {', '.join(lacking)}")
    if no_target:
        notes.append(f"no --target-acc recorded for {len(no_target)} run(s), left out: {', '.join(no_target)}")
    if short_windows:
        notes.append(f"{metric}: {len(short_windows)} run(s) have fewer than {metric.n} evaluations in window "
                     f"{window} (fewest {min(short_windows)}); their statistic is the mean of all they have")

    missing = []
    for key, g in groups.items():
        base_config = baseline_config(recorded[key])
        base = groups.get(_key(base_config))
        g.is_baseline = base is g
        g.baseline = base.label if base is not None else None
        if base is None:
            elsewhere = [f"{other.label} differs only in {why}" for other in groups.values()
                         if (why := environment_difference(base_config, other.config, sources))]
            if elsewhere:
                notes.append(f"{g.label}: no baseline with its data, device and precision ({'; '.join(elsewhere)}): "
                             "not paired")
            else:
                missing.append(g.label)
        elif not g.is_baseline:
            g.test = paired_test(g, base)
        _costs(g, base)
    if missing:
        notes.append("no baseline (the unfiltered AdamW run with the same other settings) for "
                     f"{', '.join(missing)}: the baseline difference, memory share and step-time columns are n/a")
    notes += _environment_notes(list(groups.values()), sources)

    ordered = sorted(groups.values(), key=lambda g: _sort_key(g, lower_is_better))
    notes += _test_notes(ordered) + _tie_notes(ordered) + _infinite_notes(ordered, metric, lower_is_better)
    return Comparison(metric, window, column, ordered, notes)


def _resample_grid(runs: Sequence[Run], metric: Metric, column: Column, n: int, notes: list[str]) -> np.ndarray:
    """The common epoch grid of `--resample n`, with a note saying so."""
    if metric.kind == "steps_to_target":
        raise ValueError("--resample does not apply to --metric steps_to_target (the step of an evaluation)")
    ends = [(s.epochs[-1], run.status == "diverged") for run in runs
            if not lacks_column(run, column) and (s := run_series(run, column)).epochs.size]
    grid = epoch_grid((end for end, _ in ends), n)
    shorter = sum(1 for end, diverged in ends if end < grid[-1] and not diverged)  # a diverged run keeps its points
    notes.append(f"curves resampled onto {n} epoch points 0..{grid[-1]:g}"
                 + (f"; {shorter} run(s) end earlier and have fewer points" if shorter else ""))
    return grid


def _labels(configs: dict[tuple, dict[str, Any]]) -> dict[tuple, tuple[str, str]]:
    """(label, other settings): the short label plus every other setting that differs between the configurations."""
    values: dict[str, set] = {}
    for cfg in configs.values():
        for k, v in cfg.items():
            if k not in IDENTITY_KEYS:
                values.setdefault(k, set()).add(_hashable(v))
    varying = sorted(k for k, vs in values.items() if len(vs) > 1)
    labels, used = {}, set()
    for key, cfg in configs.items():
        settings = " ".join(_format_setting(k, cfg[k]) for k in varying if k in cfg)
        label = " ".join(filter(None, [short_label(cfg), settings]))
        base, i = label, 2
        while label in used:  # only if two settings print alike (e.g. floats equal to 6 digits)
            label, i = f"{base} #{i}", i + 1
        used.add(label)
        labels[key] = (label, settings)
    return labels


def _environment_notes(groups: list[Group], sources: dict[str, str]) -> list[str]:
    """One note per pair of configurations that differ only in data, device, precision, compile or world size."""
    notes = []
    groups = sorted(groups, key=lambda g: g.label)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            why = environment_difference(a.config, b.config, sources)
            if why:
                notes.append(f"{a.label} and {b.label} differ only in {why}: listed apart, never pooled or paired")
    return notes


def _describe(g: Group) -> None:
    values = np.asarray(g.values, dtype=float)
    g.n = len(values)
    g.mean = float(values.mean()) if g.n else None
    g.std = float(values.std(ddof=1)) if g.n >= 2 and np.isfinite(values).all() else None


def _per_seed(g: Group) -> dict[Any, float]:
    by_seed: dict[Any, list[float]] = {}
    for seed, value in zip(g.seeds, g.values):
        if seed is not None:
            by_seed.setdefault(seed, []).append(value)
    return {seed: float(np.mean(v)) for seed, v in by_seed.items()}


def paired_test(g: Group, base: Group) -> PairedTest:
    """Config minus baseline over the seeds both have: mean difference, 95% t interval, ttest_rel p-value."""
    mine, theirs = _per_seed(g), _per_seed(base)
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
            n = len(d)
            scale = float(d.std(ddof=1)) / math.sqrt(n)
            test.ci_low, test.ci_high = (float(v) for v in stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=scale))
            test.statistic, test.p_value = float(result.statistic), float(result.pvalue)
    test.reason = "; ".join(reasons) or None
    return test


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
    if g.config.get("optimizer") == "grokadamw":  # its EMA sits in the optimizer state, not in a filter
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
        if metric.kind == "steps_to_target":
            longest = max((r.get("step", 0) for run in g.runs for r in run_rows(run)), default=0)
            why = f"never reached the target (the longest ran {longest:,} steps)"
        else:
            why = "diverged within the window"
        notes.append(f"{g.label}: {bad} of {g.n} run(s) {why}, so its mean is "
                     f"{'+' if lower_is_better else '-'}inf and its std n/a")
    return notes


# ----------------------------------------------------------------------------------------------- tables

NA = "n/a"
SELF = "—"
CSV_FIELDS = ("configuration", "n", "mean", "std", "diff", "ci_low", "ci_high", "p_value", "pairs",
              "filter_mb", "filter_pct_of_peak", "step_time_overhead_pct", "baseline", "metric", "window", "column")


def format_table(comparison: Comparison, fmt: str = "markdown") -> str:
    """Markdown (title, table, notes) or CSV (one row per configuration; notes via `format_notes`)."""
    if fmt == "csv":
        return _csv(comparison)
    if fmt != "markdown":
        raise ValueError(f"--format must be markdown or csv (got {fmt!r})")
    c = comparison
    title = (f"{c.metric.describe(c.column)}, {c.window.describe()} "
             f"({'lower' if c.metric.lower_is_better(c.column) else 'higher'} is better); mean ± std over seeds, "
             f"difference = configuration − baseline, paired over shared seeds")
    header = ["configuration", "n", f"{c.metric} ({c.window})", "Δ vs baseline", f"{CONFIDENCE:.0%} CI", "p",
              "pairs", "filter MB", "% of peak", "step time"]
    spec = c.metric.spec
    rows = [[g.label, str(g.n), _mean_std(g, spec), *_diff_cells(g, spec), _num(g.filter_mb, ".1f"),
             _pct(g.filter_pct_of_peak, ".2f"), SELF if g.is_baseline else _pct(g.step_time_overhead_pct, "+.1f")]
            for g in c.groups]
    lines = [title, "", _md_row(header), _md_row(["---"] * len(header))] + [_md_row(r) for r in rows]
    notes = format_notes(c)
    return "\n".join(lines + (["", notes] if notes else [])) + "\n"


def format_notes(comparison: Comparison) -> str:
    return "\n".join(["Notes:"] + [f"- {n}" for n in comparison.notes]) if comparison.notes else ""


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _num(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return NA
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = format(value, spec)
    return format(0.0, spec) if float(text) == 0 else text  # no "-0.0" from rounding noise


def _pct(value: float | None, spec: str) -> str:
    text = _num(value, spec)
    return text if text == NA else text + "%"


def _mean_std(g: Group, spec: str) -> str:
    if g.mean is None:
        return NA
    return f"{_num(g.mean, spec)} ± {_num(g.std, spec)}"


def _diff_cells(g: Group, spec: str) -> list[str]:
    if g.is_baseline:
        return [SELF, SELF, SELF, SELF]
    t = g.test
    if t is None:
        return [NA, NA, NA, NA]
    ci = NA if t.ci_low is None else f"[{t.ci_low:+{spec}}, {t.ci_high:+{spec}}]"
    p = NA if t.p_value is None else f"{t.p_value:.3g}"
    return [_num(t.mean_diff, "+" + spec), ci, p, str(t.n_pairs)]


def _csv(c: Comparison) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    cell = lambda v: "" if v is None else (repr(v) if isinstance(v, float) else str(v))  # noqa: E731
    for g in c.groups:
        t = g.test or PairedTest(0, ())
        writer.writerow([cell(v) for v in (
            g.label, g.n, g.mean, g.std, t.mean_diff, t.ci_low, t.ci_high, t.p_value,
            None if g.test is None else t.n_pairs, g.filter_mb, g.filter_pct_of_peak, g.step_time_overhead_pct,
            g.baseline, str(c.metric), str(c.window), c.column.name)])
    return out.getvalue()
