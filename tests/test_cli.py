import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import pytest
from click.core import ParameterSource

from hlb_gpt.cli import CommaList, Duration, cli, compare_command, configs_from_flags, main
from hlb_gpt.config import GRID_KEYS, RunConfig
from hlb_gpt.records import read_run

TINY = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes"]


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_help_documents_every_training_option(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for flag in ["--dataset", "--data-dir", "--data-cache", "--tokenizer", "--preset", "--depth", "--width",
                 "--seq-len", "--batch-size", "--grad-accum", "--lr", "--weight-decay", "--gate", "--device",
                 "--precision", "--compile / --no-compile", "--epochs", "--evals-per-epoch", "--eval-tokens",
                 "--seed", "--out", "--grokfast", "--alpha", "--gain", "--filter", "--window", "--filter-dtype",
                 "--clip", "--optimizer", "--grok-kappa", "--grok-gamma", "--seq-warmup / --no-seq-warmup",
                 "--attention"]:
        assert flag in out, flag


@pytest.mark.parametrize("args", [
    ["--grokfast", "--alpha", "1.5"],
    ["--grokfast", "--alpha", "0.9,1.0"],
    ["--grokfast", "--gain", "-1"],
    ["--grokfast", "--filter", "ma", "--window", "0"],
    ["--epochs", "0"],
    ["--epochs", "-2"],
    ["--width", "100"],
    ["--dataset", "wikitext-7"],
    ["--tokenizer", "words"],
    ["--alpha", "abc"],
    ["--seed", "0,x"],
    ["--batch-size", "6", "--grad-accum", "4"],
    ["--data-dir", "/nonexistent/folder"],
    ["--task", "modular", "--optimizer", "grokadamw"],
    ["--task", "modular", "--gate", "relu"],
    ["--device", "cpu", "--attention", "flex"],  # torch has no FlexAttention backward on CPU
    ["--attention", "flash"],
    ["--no-such-flag"],
    ["--eval-tokens", "256"],  # tiny's --seq-len is 256: one window needs 257 tokens
    ["--seq-len", "64", "--eval-tokens", "64"],
    ["--grokfast", "--filter", "ma", "--window", "100000000"],  # ~180 TiB of filter state
    ["--grokfast", "--filter", "ema,ma", "--window", "10,100000000"],  # one grid point too big is enough
    ["--checkpoint-every", "abc"],
    ["--checkpoint-every", "-2m"],
    ["--target-loss", "nan"],
    ["--target-loss", "inf"],
    ["--target-loss", "0"],
    ["--target-loss", "-1"],
    ["--task", "modular", "--target-loss", "3"],
    ["--target-acc", "0.9"],  # a language model has no accuracy
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, capsys, tmp_path):
    out_dir = tmp_path / "sweep"
    code, _, err = run_main(TINY + args + ["--out", str(out_dir), "--data-cache", str(tmp_path / "cache")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    assert not out_dir.exists() and not (tmp_path / "cache").exists()


def test_a_bad_checkpoint_cadence_is_named_in_the_error(capsys, tmp_path):
    code, _, err = run_main(TINY + ["--checkpoint-every", "abc", "--out", str(tmp_path / "sweep")], capsys)
    assert code == 2
    assert err.strip() == ("Error: --checkpoint-every must be a number of epochs or minutes like 30m (also 90s, 2h), "
                           "0 for none (got 'abc')")


def test_unwritable_out_is_rejected_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_main(TINY + ["--out", str(blocker / "sweep")], capsys)
    assert code == 2 and "--out" in err


def test_the_three_entry_points_print_the_same_help():
    outputs = []
    for cmd in (["hlb-gpt"], [sys.executable, "-m", "hlb_gpt"], [sys.executable, "cli.py"]):
        res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, check=True)
        outputs.append(res.stdout)
    assert outputs[0] == outputs[1] == outputs[2]


# --- environment variables ------------------------------------------------------------------------------------


def env_name(prefix: str, option: click.Option) -> str:
    """The documented name: the prefix, then the long flag in capitals with dashes as underscores."""
    flag = next(o for o in option.opts if o.startswith("--"))
    return f"{prefix}_{flag[2:].upper().replace('-', '_')}"


def env_sample(option: click.Option, tmp_path) -> tuple[str, Any]:
    """A value for the option's variable that differs from its default, and what the option should parse it to."""
    if option.is_flag:
        value = not option.default  # --compile/--no-compile defaults to None: "1" gives True
        return ("1" if value else "0"), value
    kind = option.type.item if isinstance(option.type, CommaList) else option.type
    listed = isinstance(option.type, CommaList)
    if isinstance(kind, click.Choice):
        default = option.default[0] if isinstance(option.default, list) else option.default
        choice = next(c for c in kind.choices if c != default)
        return choice, [choice] if listed else choice
    if isinstance(kind, click.Path):
        return str(tmp_path / "somewhere"), Path(tmp_path / "somewhere") if kind.type is Path else str(tmp_path / "somewhere")
    if isinstance(kind, click.types.FloatParamType):
        return "0.5", [0.5] if listed else 0.5
    if isinstance(kind, click.types.IntParamType):
        return "3", [3] if listed else 3
    if isinstance(kind, Duration):
        return "90s", 90.0
    return "some-text", "some-text"


def options_of(command: click.Command) -> list[click.Option]:
    # --help and --version act at once and hold no setting: they are not read from the environment.
    return [p for p in command.params if isinstance(p, click.Option) and p.expose_value]


def test_every_training_flag_can_come_from_hlb_gpt_flag_in_the_environment(monkeypatch, tmp_path):
    options = options_of(cli)
    # Read from the command itself, so a flag added later is covered too.
    # Every setting of a run is a flag, and so are the sweep's own.
    settings = {field.name for field in fields(RunConfig)} | {"baseline", "out", "lock_timeout", "resume", "quiet"}
    assert settings <= {o.name for o in options}
    for option in options:
        text, expected = env_sample(option, tmp_path)
        monkeypatch.setenv(env_name("HLB_GPT", option), text)
    ctx = cli.make_context("hlb-gpt", [], auto_envvar_prefix="HLB_GPT")
    for option in options:
        assert ctx.get_parameter_source(option.name) == ParameterSource.ENVIRONMENT, env_name("HLB_GPT", option)
        assert ctx.params[option.name] == env_sample(option, tmp_path)[1], env_name("HLB_GPT", option)


# Generic samples that no setting accepts on its own; any other value of env_sample's kind would do.
VALID_SAMPLES = {"width": ("64", [64]), "grad_accum": ("4", 4), "eval_tokens": ("0", 0),
                 "checkpoint_every": ("30m", "30m"), "lora_targets": ("head,in", "in,head"),
                 "train_only": ("head", "head"), "train_tokens_limit": ("65536", [65536])}  # hlb: 64 x 1024 a step
# Settings that are refused unless another one is set too.
COMPANIONS = {"muon_lr": {"HLB_GPT_OPTIMIZER": "muon"}, "muon_momentum": {"HLB_GPT_OPTIMIZER": "muon"},
              "target_acc": {"HLB_GPT_TASK": "modular"}}


def test_hlb_gpt_field_in_the_environment_sets_that_field_of_the_run(monkeypatch, tmp_path):
    options = {o.name: o for o in options_of(cli)}
    (tmp_path / "somewhere").mkdir()  # the sample folder of --data-dir and --data-cache
    for name in ("wiki.train.raw", "wiki.valid.raw"):
        (tmp_path / "somewhere" / name).write_text(" = Text = \n")
    for field in fields(RunConfig):
        text, parsed = VALID_SAMPLES.get(field.name) or env_sample(options[field.name], tmp_path)
        with monkeypatch.context() as env:
            env.setenv(f"HLB_GPT_{field.name.upper()}", text)
            for name, value in COMPANIONS.get(field.name, {}).items():
                env.setenv(name, value)
            ctx = cli.make_context("hlb-gpt", [], auto_envvar_prefix="HLB_GPT")
            base, grid = configs_from_flags(ctx.params)
        assert ctx.get_parameter_source(field.name) == ParameterSource.ENVIRONMENT, field.name
        if field.name in GRID_KEYS:
            assert grid[field.name] == parsed, field.name
            parsed = parsed[0]
        assert getattr(base, field.name) == parsed != field.default, field.name


def test_every_compare_flag_can_come_from_hlb_gpt_compare_flag_in_the_environment(monkeypatch, tmp_path):
    options = options_of(compare_command)
    assert {o.name for o in options} >= {"metric", "span", "column", "fmt", "plot_dir", "log_x", "zoom"}
    for option in options:
        monkeypatch.setenv(env_name("HLB_GPT_COMPARE", option), env_sample(option, tmp_path)[0])
    parent = cli.make_context("hlb-gpt", ["compare"], auto_envvar_prefix="HLB_GPT", resilient_parsing=True)
    ctx = compare_command.make_context("compare", [str(tmp_path)], parent=parent)
    for option in options:
        assert ctx.get_parameter_source(option.name) == ParameterSource.ENVIRONMENT, option.name
        assert ctx.params[option.name] == env_sample(option, tmp_path)[1], option.name


def test_filter_wandb_and_resume_from_the_environment_reach_the_run(monkeypatch, capsys, tmp_path):
    captured = []
    monkeypatch.setattr("hlb_gpt.sweep.run_sweep", lambda configs, out, **kw: captured.extend(configs) or [])
    monkeypatch.setenv("HLB_GPT_FILTER", "ma")
    monkeypatch.setenv("HLB_GPT_WANDB", "1")
    monkeypatch.setenv("HLB_GPT_GROKFAST", "1")
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "sweep")], capsys)
    assert code == 0, err
    assert [(c.grokfast, c.filter, c.wandb) for c in captured] == [(True, "ma", True)]
    monkeypatch.setenv("HLB_GPT_RESUME", str(tmp_path / "not-a-run"))
    code, _, err = run_main(TINY, capsys)
    assert code == 2 and f"--resume {tmp_path / 'not-a-run'}: not a run folder" in err


# --- the README ----------------------------------------------------------------------------------------------


def readme_options_table(readme: str) -> list[tuple[list[str], str]]:
    """The rows of the README's options table: the text of each flag (`--gate {none,relu,sigmoid}`), the default."""
    section = readme.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `--")]
    return [(re.findall(r"`(--[^`]*)`", row[0]), row[1].replace("`", "").strip()) for row in rows]


def check_options_table(readme: str) -> None:
    # Every option the README documents: the settings, and --config, which holds none itself.
    options = [p for p in cli.params if isinstance(p, click.Option) and p.name not in ("help", "version")]
    by_flag = {flag: option for option in options for flag in option.opts + option.secondary_opts}
    documented = set()
    for flags, default in readme_options_table(readme):
        named = [by_flag.get(re.match(r"--[a-z0-9-]+", text).group()) for text in flags]
        assert None not in named, f"the README names a flag hlb-gpt does not have: {flags}"
        documented |= {option.name for option in named}
        for text, option in zip(flags, named):
            for other in re.findall(r"--[a-z0-9-]+", text):
                assert by_flag.get(other) is option, f"{text}: {other} is not a form of {option.opts[0]}"
            choices = re.search(r"\{(.*)\}", text)
            kind = option.type.item if isinstance(option.type, CommaList) else option.type
            if choices or isinstance(kind, click.Choice):
                assert choices and choices.group(1).split(",") == list(kind.choices), text
        shown = default.split(", ") if len(named) > 1 else [default]
        shown = shown * len(named) if len(shown) == 1 else shown
        assert len(shown) == len(named), f"{flags}: one default per flag, or one for all (got {default!r})"
        for option, text in zip(named, shown):
            if option.default is None:  # unset: the README says in words what it means ("preset", "off")
                continue
            expected = ("on" if option.default else "off") if isinstance(option.default, bool) else str(option.default)
            try:
                assert float(text) == float(expected), option.opts[0]
            except ValueError:
                assert text == expected, option.opts[0]
    missing = {option.opts[0] for option in options if option.name not in documented}
    assert not missing, f"flags without a row in the README's options table: {sorted(missing)}"


def test_the_readme_options_table_names_every_flag_its_choices_and_default():
    check_options_table((Path(__file__).parent.parent / "README.md").read_text())


# --- input that used to fail late -----------------------------------------------------------------------------


def test_a_filter_too_big_for_memory_is_refused_with_the_estimate_and_the_fixes(capsys, tmp_path):
    code, _, err = run_main(TINY + ["--grokfast", "--filter", "ma", "--window", "100000000", "--out", str(tmp_path)],
                            capsys)
    assert code == 2
    assert "the MA filter's state needs about" in err and "100,000,001 copies of 475,780 parameters" in err
    assert "--window" in err and "--filter-dtype bfloat16" in err


def test_the_parameter_count_for_the_memory_check_is_the_built_model_s(tmp_path):
    import torch

    from hlb_gpt.config import RunConfig
    from hlb_gpt.model import GPT, GPTConfig, pad_vocab
    from hlb_gpt.tasks.modular import ModularConfig, ModularTransformer
    from hlb_gpt.train import count_params

    for tokenizer, vocab, gate in (("bytes", 256, "none"), ("gpt2", 50257, "relu")):
        cfg = RunConfig(preset="tiny", tokenizer=tokenizer, depth=2, gate=gate)
        built = GPT(GPTConfig(vocab_size=pad_vocab(vocab), depth=2, width=128, max_seq_len=256, gate=gate))
        assert count_params(cfg) == built.num_params()
    assert count_params(RunConfig(task="modular")) == ModularTransformer(ModularConfig()).num_params()
    assert torch.empty(0).device.type == "cpu"  # the meta device did not leak out


def train_on_text(train_text: bytes, capsys, tmp_path):
    """Run TINY on a --data-dir whose training file holds `train_text`: (exit code, stderr, the data folder)."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "wiki.train.raw").write_bytes(train_text)
    (folder / "wiki.valid.raw").write_bytes(b" = Valid = \n" * 100)
    code, _, err = run_main(TINY + ["--data-dir", str(folder), "--out", str(tmp_path / "out"),
                                    "--data-cache", str(tmp_path / "cache")], capsys)
    return code, err, folder


def test_an_empty_training_file_is_refused_in_one_line(capsys, tmp_path):
    code, err, folder = train_on_text(b"", capsys, tmp_path)
    assert code == 2 and err.strip().splitlines() == [f"Error: --data-dir {folder}: wiki.train.raw is empty"]
    assert not (tmp_path / "out").exists()


def test_a_training_text_shorter_than_one_window_is_refused_in_one_line(capsys, tmp_path):
    code, err, _ = train_on_text(b" = Short = \n", capsys, tmp_path)
    assert code == 2
    assert err.strip().splitlines() == ["Error: the training text has 12 tokens, fewer than --seq-len + 1 = 257; "
                                        "use a shorter --seq-len or more training text"]


def test_a_billion_epochs_with_max_steps_runs_its_five_steps(capsys, tmp_path):
    # The step count of 1e9 epochs used to be walked step by step: tens of minutes before the first step.
    code, out, err = run_main(TINY + ["--depth", "1", "--width", "32", "--seq-len", "32", "--batch-size", "4",
                                      "--eval-tokens", "1024", "--epochs", "1e9", "--max-steps", "5", "-q",
                                      "--checkpoint-every", "0", "--out", str(tmp_path / "out"),
                                      "--data-cache", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert "baseline-s0: completed" in out
    assert read_run(tmp_path / "out" / "baseline-s0").summary["steps"] == 5


def test_data_dir_runs_are_named_and_recorded_by_their_folder(tmp_path):
    from hlb_gpt.cli import default_out
    from hlb_gpt.config import RunConfig
    from hlb_gpt.data import data_source

    folder = tmp_path / "my-corpus"
    folder.mkdir()
    for name in ("wiki.train.raw", "wiki.valid.raw"):
        (folder / name).write_text(" = Text = \n" * 100)
    cfg = RunConfig(data_dir=str(folder), preset="tiny")
    assert "-my-corpus-tiny" in default_out(cfg, grokfast=False).name
    assert "wikitext-103" not in default_out(cfg, grokfast=False).name
    assert data_source(cfg.dataset, cfg.data_dir) == f"folder {folder.resolve()}"
    assert data_source("mini", None).startswith("mini, bundled")


def test_a_runs_result_line_says_whether_and_when_it_reached_its_target_loss():
    from hlb_gpt.cli import _result_line

    summary = {"best_val_loss": 3.4, "final_val_loss": 3.4, "target_loss": 3.5, "steps_to_target": 120,
               "time_to_target_s": 12.34}
    assert _result_line("baseline-s0", "completed", summary).endswith(
        ", val loss 3.5 reached at step 120 (12.3 s of training)")
    missed = {**summary, "steps_to_target": None, "time_to_target_s": None}
    assert _result_line("baseline-s0", "completed", missed).endswith(", val loss 3.5 not reached")
