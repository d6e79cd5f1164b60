"""The command line: flags → validated configs → a sweep of training runs (or `compare`).

Only this module knows about click. Bad input is rejected before any work with one line on stderr and exit
code 2; a data source that cannot be reached exits with 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

import click

from hlb_gpt import __version__
from hlb_gpt.config import DEVICES, GRID_KEYS, MAY_CHANGE_ON_RESUME, ConfigError, RunConfig, check_resumable, flag


class RegisteredChoice(click.Choice):
    """A choice among names read when the flag is parsed or its help shown: registered components (those registered
    after import count too), compare's columns (without importing compare's statistics for every command)."""

    def __init__(self, names: Callable[[], tuple[str, ...]]) -> None:
        super().__init__(())
        self._names = names

    @property
    def choices(self) -> tuple[str, ...]:
        return self._names()

    @choices.setter
    def choices(self, value: tuple[str, ...]) -> None:
        pass


class CommaList(click.ParamType):
    """A comma-separated list of values of one type, e.g. `--alpha 0.8,0.9,0.99`."""

    def __init__(self, item: click.ParamType):
        self.item = item
        self.name = f"{item.name}[,...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("expected at least one value", param, ctx)
        return [self.item.convert(v, param, ctx) for v in items]


class Duration(click.ParamType):
    """Seconds, given as 600, 90s, 10m or 1.5h."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from hlb_gpt.locks import parse_duration

        if isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RenamedOption(click.Option):
    """A setting whose flag is not its name (`--train-tokens` sets `train_tokens_limit`): read from the environment
    as HLB_GPT_<FLAG>, as every other flag, and as HLB_GPT_<FIELD>, as every other setting."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        if ctx.auto_envvar_prefix is not None:
            value = os.environ.get(f"{ctx.auto_envvar_prefix}_{self.opts[0][2:].upper().replace('-', '_')}")
            if value:
                return value
        return super().resolve_envvar_value(ctx)


LOCK_TIMEOUT = click.option(
    "--lock-timeout", type=Duration(), default="10m", show_default=True,
    help="A run whose process on another host has sent no heartbeat for this long (600, 90s, 10m, 1.5h) is taken "
         "over by another process of the sweep; on this host, at once when its process is gone, never while it "
         "lives.")


# The flags that are not settings of a run: how a sweep is run, and where.
BASELINE = click.option("--baseline", is_flag=True, default=False,
                        help="With --grokfast: also run the unfiltered configuration per seed.")
OUT = click.option("--out", type=click.Path(file_okay=False), default=None,
                   help="Sweep folder [runs/<time>-<dataset>-<preset>]. Re-running a command with it skips completed "
                        "runs and continues interrupted ones.")
RESUME = click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Continue this run folder from its latest checkpoint, with its recorded settings (flags may "
                           "change only --epochs, --max-steps, --device and logging).")
QUIET = click.option("--quiet", "-q", is_flag=True, default=False, help="No progress bars.")


def load_config_file(ctx: click.Context, param: click.Parameter, path: Path | None) -> Path | None:
    """`--config FILE`: the file's settings become the command's defaults (click's default map), before any other
    option is read, so a flag or an HLB_GPT_* variable overrides them and each value is parsed by its flag's type."""
    if path is None:
        return None
    from hlb_gpt.configfile import read_settings

    params = {p.name: p for p in ctx.command.params
              if isinstance(p, click.Option) and p.name not in NOT_IN_FILE and not p.hidden}
    grid = frozenset(name for name, p in params.items() if isinstance(p.type, CommaList))
    flag_names = {p.opts[0][2:].replace("-", "_"): name for name, p in params.items() if isinstance(p, RenamedOption)}
    settings = read_settings(path, {name: _file_kinds(p) for name, p in params.items()}, grid, flag_names)
    defaults = {}
    for name, value in settings.items():
        option = params[name]
        try:
            if isinstance(option.type, CommaList) and isinstance(value, list):
                defaults[name] = [option.type.item.convert(v, option, ctx) for v in value]
            else:
                defaults[name] = option.type.convert(value, option, ctx)
        except click.BadParameter as exc:
            raise ConfigError(f"--config {path}: {name}: {exc.message}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


# Options a file does not give: the file itself, and continuing a run (which has its own recorded settings).
NOT_IN_FILE = frozenset({"config", "resume", "help", "version"})


def _file_kinds(option: click.Option) -> tuple[type, ...]:
    """The JSON/TOML types a file may give an option's value in: the field's annotation for a setting (a float
    takes an integer as well)."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    if option.name in fields:
        annotation = typing.get_type_hints(RunConfig)[option.name]
        kinds = tuple(t for t in typing.get_args(annotation) or (annotation,) if t is not type(None))
        return (*kinds, int) if float in kinds else kinds
    if option.is_flag:
        return (bool,)
    return (str, float, int) if isinstance(option.type, Duration) else (str,)


CONFIG = click.option(
    "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, is_eager=True,
    expose_value=False, callback=load_config_file,
    help="Settings from a TOML file (keys as the flags', e.g. weight_decay = 0.1; a list makes a grid) or a run's "
         "config.json; flags and HLB_GPT_* variables override it.")


# Where --help shows them: after the field they belong with.
EXTRA_OPTIONS = {"grokfast": [BASELINE], "max_bad_steps": [OUT], "keep_checkpoints": [LOCK_TIMEOUT, RESUME],
                 "wandb_project": [QUIET]}


def field_option(field: dataclasses.Field, annotation: Any) -> Callable:
    """The click option of a `RunConfig` field, from the field's default and its `config.setting` metadata.

    The parameter is named after the field, so click reads it from HLB_GPT_<FIELD> as well.
    """
    meta = field.metadata
    kind = meta.get("parse") or next(t for t in typing.get_args(annotation) or (annotation,) if t is not type(None))
    help_text = meta.get("help", "")
    if meta.get("note"):
        help_text = f"{help_text.rstrip('.')} [{meta['note']}]."
    if kind is bool and meta.get("negatable"):  # --seq-warmup/--no-seq-warmup
        return click.option(f"{flag(field.name)}/--no-{flag(field.name)[2:]}", field.name, default=field.default,
                            show_default=field.default is not None, help=help_text)
    if kind is bool:
        return click.option(flag(field.name), field.name, is_flag=True, default=field.default, help=help_text)
    if callable(meta.get("choices")):  # the registered components, read when the flag is parsed
        value_type = RegisteredChoice(meta["choices"])
    elif meta.get("choices"):
        value_type = click.Choice(meta["choices"])
    elif meta.get("folder"):
        value_type = click.Path(file_okay=False)
    else:
        value_type = {int: click.INT, float: click.FLOAT, str: click.STRING}[kind]
    if meta.get("grid"):
        value_type = CommaList(value_type)
        help_text += " List for a grid."
    return click.option(flag(field.name), field.name, type=value_type, default=field.default,
                        show_default=field.default is not None, help=help_text,
                        cls=RenamedOption if meta.get("flag") else click.Option)


def _options(fn: Callable) -> Callable:
    """The training flags, in the order --help shows them: one per `RunConfig` field, and the sweep's own.

    Every flag can come from the environment as HLB_GPT_<FLAG> (`compare`'s as HLB_GPT_COMPARE_<FLAG>): click
    derives that name from the parameter's name, which is the flag's.
    """
    annotations = typing.get_type_hints(RunConfig)
    opts = [CONFIG]
    for field in dataclasses.fields(RunConfig):
        opts += [field_option(field, annotations[field.name]), *EXTRA_OPTIONS.get(field.name, [])]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.version_option(__version__, prog_name="hlb-gpt")
@click.pass_context
def cli(ctx: click.Context, **flags: Any) -> None:
    """Train small GPTs on WikiText, with and without Grokfast, and record every run.

    \b
    Examples:
      hlb-gpt --dataset mini --preset tiny --tokenizer bytes --epochs 1
      hlb-gpt --grokfast --alpha 0.9 --gain 0.1 --epochs 260
      hlb-gpt --grokfast --baseline --alpha 0.8,0.99 --gain 0.1,5 --seed 0,1,2 --out runs/grid
    """
    if ctx.invoked_subcommand is not None:
        return
    from hlb_gpt.sweep import expand_grid, run_folder_name, run_sweep, varying  # imports torch: only when training

    if flags["resume"] is not None:
        return resume_run(ctx, flags)
    if flags["init_from"] is not None:
        flags = inherit_from_init(ctx, flags)
    base, grid = configs_from_flags(flags)
    configs = expand_grid(base, grid, grokfast=flags["grokfast"], baseline=flags["baseline"])
    vary = varying(grid)
    if len({run_folder_name(c, vary) for c in configs}) != len(configs):
        raise ConfigError("two grid points would share a run folder; remove repeated values from the lists")
    out = Path(flags["out"] or default_out(base, flags["grokfast"]))
    check_writable(out)
    from hlb_gpt.finetune import check_init, pin_base
    from hlb_gpt.train import check_attention, check_disk, check_memory

    for cfg in configs:
        check_init(cfg)
        check_attention(cfg)
        check_memory(cfg)
    check_disk(configs, [out / run_folder_name(c, vary) for c in configs])
    if base.init_from is not None:  # one base for every run of the sweep, in every worker: fixed before the first
        pin_base(out, base.init_from)
    results = run_sweep(configs, out, vary=vary, progress=not flags["quiet"], lock_timeout_s=flags["lock_timeout"])
    if os.environ.get("RANK", "0") != "0":
        return
    for r in results:
        click.echo(f"{r.name}: running on {r.holder}" if r.status == "running"
                   else _result_line(r.name, r.status, r.summary or {}))
    click.echo(f"records: {out}")
    if any(r.status not in ("completed", "running") for r in results):  # runs other processes train are theirs
        sys.exit(1)


@cli.command("status")
@click.argument("sweep", type=click.Path(exists=True, file_okay=False, path_type=Path))
@LOCK_TIMEOUT
def status_command(sweep: Path, lock_timeout: float) -> None:
    """Where a sweep stands: each run's state, epochs done and last validation loss.

    States: pending (not started), running on host:pid, stale lock (its process died or stopped sending
    heartbeats: the next sweep command takes it over), unfinished (stopped without a summary), completed,
    diverged, failed, interrupted.

    \b
    Example:
      hlb-gpt status runs/grid
    """
    from hlb_gpt.status import format_status, sweep_states

    click.echo(format_status(sweep_states(sweep, lock_timeout)))


def _columns() -> dict:
    from hlb_gpt.compare.statistics import COLUMNS

    return COLUMNS


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--metric", default="final", show_default=True,
              help="Per-run statistic: final, best, best:N (mean of the N best evaluations), mean, "
                   "steps_to_target (--task modular: the step val_acc first reached the run's --target-acc), or "
                   "steps_to:X and time_to:X (the step and the training seconds val_loss first reached X).")
@click.option("--span", envvar="HLB_GPT_COMPARE_SPAN", default="all", show_default=True,
              help="Epochs the statistic covers: all, first:K or last:K (K in epochs).")
# The old name of --span, which read as the MA filter's --window (in steps): still accepted, with a note.
@click.option("--window", "old_span", envvar="HLB_GPT_COMPARE_WINDOW", default=None, hidden=True)
@click.option("--column", type=RegisteredChoice(lambda: tuple(_columns())), default=None,
              help="The metrics.jsonl column compared and plotted, or summary.json's test_* (--eval-test) "
                   "[val_loss; val_acc for steps_to_target].")
@click.option("--format", "fmt", envvar="HLB_GPT_COMPARE_FORMAT", type=click.Choice(["markdown", "csv"]),
              default="markdown", show_default=True)
@click.option("--plot", "plot_dir", envvar="HLB_GPT_COMPARE_PLOT", type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="Write PNG plots (the column vs epoch, the statistic vs gain, the forest plot of the paired "
                   "differences) into this folder.")
@click.option("--log-x", is_flag=True, help="Plots: logarithmic epoch axis (the first epochs stay visible).")
@click.option("--zoom", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Plots: also draw the first K epochs on their own.")
@click.option("--resample", type=click.IntRange(min=2), default=None, metavar="N",
              help="Interpolate every curve onto N evenly spaced epochs (0 to the longest run's last evaluation) "
                   "before the statistic, so runs evaluated at different cadences compare fairly; N at most "
                   "1,000,000 [off].")
@click.pass_context
def compare_command(ctx: click.Context, runs: tuple[Path, ...], metric: str, span: str, old_span: str | None,
                    column: str | None, fmt: str, plot_dir: Path | None, log_x: bool, zoom: float | None,
                    resample: int | None) -> None:
    """Compare runs: per configuration mean ± std over seeds, and the paired difference to the baseline.

    RUNS are sweep folders or run folders. Runs are grouped by every setting but the seed; each filtered
    configuration is tested against the unfiltered one over the seeds both have (paired t-test, 95% interval;
    its p-value also Holm- and BH-adjusted over the configurations tested against the same baseline).

    \b
    Example:
      hlb-gpt compare runs/grid --metric best:5 --span last:50 --plot runs/grid/plots --log-x
      hlb-gpt compare runs/grid --metric best:5 --resample 200
      hlb-gpt compare runs/grokking --metric steps_to_target --plot runs/grokking/plots
    """
    from hlb_gpt import compare as cmp

    if old_span is not None:
        if ctx.get_parameter_source("span") not in (None, click.core.ParameterSource.DEFAULT):
            raise click.UsageError("--window is the old name of --span: give --span only")
        click.echo("note: compare's --window is now --span (--window is the MA filter's, in steps)", err=True)
        span = old_span
    try:
        parsed = cmp.parse_choices(metric, span, column)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    loaded, notes = cmp.load_runs(runs)
    if not loaded:  # the notes say why: no run folder, or none with an evaluation
        shown = "; ".join(" ".join(note.split()) for note in notes[:3])
        raise click.UsageError(f"nothing to compare: {shown}" + (f" (and {len(notes) - 3} more)" if len(notes) > 3
                                                                 else ""))
    if parsed[0].kind != "steps_to_target" and all(cmp.lacks_column(run, parsed[2]) for run in loaded):
        raise click.UsageError(f"--column {parsed[2].name}: none of these runs records it ({cmp.COLUMN_OWNERS})")
    try:
        comparison = cmp.compare(loaded, *parsed, notes=notes, resample=resample)
    except ValueError as exc:  # --resample with a steps_to/time_to metric, or too many points
        raise click.UsageError(str(exc)) from None
    if plot_dir is not None:
        from hlb_gpt.plots import check_plot_dir

        check_plot_dir(plot_dir)  # before the table: a refusal after it would read as a failed comparison
    click.echo(cmp.format_table(comparison, fmt))
    if fmt == "csv" and (notes := cmp.format_notes(comparison)):
        click.echo(notes, err=True)
    if plot_dir is not None:
        from hlb_gpt.plots import plot

        try:
            paths = plot(comparison, plot_dir, log_x=log_x, zoom=zoom)
        except OSError as exc:  # the folder was writable a moment ago: a full disk
            raise ConfigError(f"--plot {plot_dir}: cannot write the plots ({exc.strerror or exc})") from None
        for path in paths:
            click.echo(f"wrote {path}", err=True)


RUN_DIR = click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
CHECKPOINT = click.option(
    "--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="Use this checkpoint file of the run [its latest: the final one once the run completed].")


@cli.command("sample")
@RUN_DIR
@click.option("--prompt", default="\n", show_default="a newline",
              help="Text the model continues (printed too).")
@click.option("--tokens", type=int, default=200, show_default=True, help="Number of new tokens.")
@click.option("--temperature", type=float, default=0.8, show_default=True,
              help="Divides the logits; higher is more varied, 0 is greedy (always the most likely token).")
@click.option("--top-k", type=int, default=None, help="Draw only from the K most likely tokens [all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same text (on the same device).")
@CHECKPOINT
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto: cuda, then mps, then cpu.")
def sample_command(run_dir: Path, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int,
                   checkpoint: Path | None, device: str) -> None:
    """Print text from a trained language-model run: the prompt, then what the model writes after it.

    \b
    Examples:
      hlb-gpt sample runs/grid/baseline-s0 --prompt " = Robert Boulter = " --tokens 300
      hlb-gpt sample runs/grid/baseline-s0 --temperature 0
    """
    from hlb_gpt.device import resolve_device
    from hlb_gpt.sample import check_sampling, sample_text
    from hlb_gpt.trained import load_trained

    check_sampling(prompt, tokens, temperature, top_k, seed)  # before the checkpoint is read
    trained = load_trained(run_dir, checkpoint)
    model = trained.model.to(resolve_device(device))
    text = sample_text(model, trained.tokenizer, prompt, tokens, temperature, top_k, seed)
    # Said once the text exists, so that a model that cannot sample (a diverged run's) gives its one line alone.
    click.echo(f"{trained.checkpoint} (step {trained.step}, {_run_state(trained.status)})", err=True)
    click.echo(text)


@cli.command("export")
@RUN_DIR
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .safetensors file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@CHECKPOINT
def export_command(run_dir: Path, out: Path, force: bool, checkpoint: Path | None) -> None:
    """Write a run's weights as a safetensors file, with its config as metadata.

    The file opens with `safetensors` alone, in any language; its metadata holds the run's config.json (key
    `config`) and the model's architecture (key `gpt_config`, the fields of hlb_gpt.model.GPTConfig).

    \b
    Example:
      hlb-gpt export runs/grid/baseline-s0 --out baseline.safetensors
    """
    from hlb_gpt.export import check_out, export_run
    from hlb_gpt.trained import load_trained

    check_out(out, force)  # before the checkpoint is read
    trained = load_trained(run_dir, checkpoint)
    export_run(trained, out, force)
    click.echo(f"wrote {out}: {trained.checkpoint.name} (step {trained.step}, {_run_state(trained.status)})")


def _run_state(status: str | None) -> str:
    return "run unfinished" if status is None else f"run {status}"


def resume_run(ctx: click.Context, flags: dict[str, Any]) -> None:
    """`--resume RUN_DIR`: the run's recorded settings, with only the flags given on this command applied."""
    from hlb_gpt.locks import read_lock, try_claim
    from hlb_gpt.records import CorruptRecord, is_run_dir, read_run
    from hlb_gpt.sweep import check_length

    run_dir: Path = flags["resume"]
    if not is_run_dir(run_dir):
        raise ConfigError(f"--resume {run_dir}: not a run folder (it has no config.json)")
    try:
        saved = read_run(run_dir).config
    except CorruptRecord as exc:
        raise ConfigError(f"--resume {run_dir}: {exc}") from None
    given = {name for name in flags
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    recorded = RunConfig.from_dict(saved)
    # The flags not given are the run's own settings, so a given one is checked against the run's preset and
    # sizes (--train-tokens against its batch), not against the defaults'.
    own = {k: [v] if k in GRID_KEYS else v for k, v in recorded.to_dict().items() if k in flags and k not in given}
    command, _ = configs_from_flags({**flags, **own})
    changes = {k: getattr(command, k) for k in MAY_CHANGE_ON_RESUME if k in given}
    check_resumable(recorded.replace(**{k: getattr(command, k) for k in given & set(command.to_dict())}), saved,
                    run_dir)
    cfg = recorded.replace(**changes)
    check_length(cfg, run_dir)
    from hlb_gpt.train import check_disk, check_memory, train

    check_memory(cfg)
    check_disk([cfg], [run_dir])
    lock = try_claim(run_dir, flags["lock_timeout"])
    if lock is None:
        raise ConfigError(f"--resume {run_dir}: the run is being trained by {read_lock(run_dir).owner}")
    with lock:
        summary = train(cfg, run_dir, progress=not flags["quiet"], resume=True, lock=lock)
    click.echo(_result_line(run_dir.name, summary["status"], summary))
    if summary["status"] != "completed":
        sys.exit(1)


def inherit_from_init(ctx: click.Context, flags: dict[str, Any]) -> dict[str, Any]:
    """`--init-from RUN_DIR`: the flags, with the run's architecture, preset and --seq-len where none was given, and
    the run as an absolute path (what config.json records: a resume from another folder finds the same run)."""
    from hlb_gpt.finetune import inherited_settings

    given = {name for name in flags
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    inherited = {k: [v] if k in GRID_KEYS else v
                 for k, v in inherited_settings(flags["init_from"]).items() if k not in given}
    return {**flags, **inherited, "init_from": str(Path(flags["init_from"]).resolve())}


def configs_from_flags(flags: dict[str, Any]) -> tuple[RunConfig, dict[str, list[Any]]]:
    """The base config (first value of every list) and the lists that make the grid. Validates every value."""
    values = {field.name: flags[field.name] for field in dataclasses.fields(RunConfig)}
    from hlb_gpt import components

    grid = {k: values[k] for k in GRID_KEYS if values[k] is not None}
    first = {**values, **{k: v[0] for k, v in grid.items()}}
    # The settings of another optimizer of the list are for its points alone (`sweep.expand_grid`).
    listed = [components.OPTIMIZERS[o] for o in grid.get("optimizer", []) if o in components.OPTIMIZERS]
    foreign = {k for o in listed for k in o.defaults} - set(components.optimizer_of(first).defaults)
    base = RunConfig(**{k: None if k in foreign else v for k, v in first.items()})
    for key, vals in grid.items():  # every grid value must be valid on its own, before any run starts
        for v in vals[1:] if key not in foreign else []:
            base.replace(**{key: v})
    return base, grid


def default_out(base: RunConfig, grokfast: bool) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = Path(base.data_dir).resolve().name if base.data_dir else base.dataset  # --data-dir replaces --dataset
    return Path("runs") / f"{stamp}-{data}-{base.preset}{'-grokfast' if grokfast else ''}"


def check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--out {out}: {probe} is not writable")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _result_line(name: str, status: str, summary: dict[str, Any]) -> str:
    """One line per run: its status and validation loss, for the grokking task its accuracy, and its target."""
    parts = [f"{name}: {status}", f"best val {_fmt(summary.get('best_val_loss'))}",
             f"final val {_fmt(summary.get('final_val_loss'))}"]
    if "best_val_acc" in summary:
        parts.append(f"best val acc {_fmt(summary['best_val_acc'])}")
    if summary.get("target_acc") is not None:
        reached = summary.get("steps_to_target")
        parts.append(f"val acc {summary['target_acc']:g} " +
                     ("not reached" if reached is None else f"reached at step {reached}"))
    if summary.get("target_loss") is not None:
        reached = summary.get("steps_to_target")
        parts.append(f"val loss {summary['target_loss']:g} " + ("not reached" if reached is None else
                     f"reached at step {reached} ({summary['time_to_target_s']:.1f} s of training)"))
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `hlb-gpt`, `python -m hlb_gpt` and `python cli.py`."""
    # Under torchrun only rank 0 reports; the other ranks speak only of problems.
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        code = cli.main(args=argv, prog_name="hlb-gpt", standalone_mode=False, auto_envvar_prefix="HLB_GPT")
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: one line, not click's three
        click.echo(f"Error: {exc.format_message()}", err=True)
        code = exc.exit_code
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        code = 2
    except (KeyboardInterrupt, click.exceptions.Abort):  # click turns Ctrl-C into Abort
        click.echo("Interrupted. A checkpointed run continues with the same command or --resume RUN_DIR.", err=True)
        code = 130
    except Exception as exc:
        from hlb_gpt.data import DataUnavailable  # imports torch: not at start-up
        from hlb_gpt.locks import LockLost

        if not isinstance(exc, (DataUnavailable, LockLost)):
            raise
        click.echo(f"Error: {exc}", err=True)
        code = 1
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun, torch is imported already
            from hlb_gpt import distributed

            distributed.shutdown()
    sys.exit(code if isinstance(code, int) else 0)
