import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.core import ParameterSource

from hlb_gpt.cli import CommaList, cli, compare_command, main

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
                 "--clip", "--optimizer", "--grok-kappa", "--grok-gamma", "--seq-warmup / --no-seq-warmup"]:
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
    ["--no-such-flag"],
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, capsys, tmp_path):
    out_dir = tmp_path / "sweep"
    code, _, err = run_main(TINY + args + ["--out", str(out_dir), "--data-cache", str(tmp_path / "cache")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    assert not out_dir.exists() and not (tmp_path / "cache").exists()


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
    return "some-text", "some-text"


def options_of(command: click.Command) -> list[click.Option]:
    # --help and --version act at once and hold no setting: they are not read from the environment.
    return [p for p in command.params if isinstance(p, click.Option) and p.expose_value]


def test_every_training_flag_can_come_from_hlb_gpt_flag_in_the_environment(monkeypatch, tmp_path):
    options = options_of(cli)
    # Read from the command itself, so a flag added later is covered too.
    assert {"filter_", "use_wandb", "resume_dir", "seq_warmup", "compile", "quiet"} <= {o.name for o in options}
    for option in options:
        text, expected = env_sample(option, tmp_path)
        monkeypatch.setenv(env_name("HLB_GPT", option), text)
    ctx = cli.make_context("hlb-gpt", [], auto_envvar_prefix="HLB_GPT")
    for option in options:
        assert ctx.get_parameter_source(option.name) == ParameterSource.ENVIRONMENT, env_name("HLB_GPT", option)
        assert ctx.params[option.name] == env_sample(option, tmp_path)[1], env_name("HLB_GPT", option)


def test_every_compare_flag_can_come_from_hlb_gpt_compare_flag_in_the_environment(monkeypatch, tmp_path):
    options = options_of(compare_command)
    assert {o.name for o in options} >= {"metric", "window_", "column", "fmt", "plot_dir", "log_x", "zoom"}
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
