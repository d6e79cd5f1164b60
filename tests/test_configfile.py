"""`--config FILE`: settings from a TOML file or a run's config.json; flags override it, lists in it make grids."""

import json
import sys
from pathlib import Path

import pytest

from hlb_gpt.records import read_run

from tiny_runs import TINY, TINY_LM, run_main



@pytest.fixture
def captured(monkeypatch):
    """The configs a command would train, without training them."""
    configs = []
    monkeypatch.setattr("hlb_gpt.sweep.run_sweep", lambda cfgs, out, **kw: configs.extend(cfgs) or [])
    return configs


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_toml_file_gives_the_settings_of_the_run(captured, capsys, tmp_path):
    config = write(tmp_path / "run.toml", 'dataset = "mini"\npreset = "tiny"\ntokenizer = "bytes"\nlr = 1e-3\n'
                                          'seq-warmup = false\ngrokfast = true\nfilter = "ma"\nwindow = 7\n')
    code, _, err = run_main(["--config", str(config), "--out", str(tmp_path / "sweep")], capsys)
    assert code == 0, err
    [cfg] = captured
    assert (cfg.dataset, cfg.preset, cfg.tokenizer, cfg.lr, cfg.seq_warmup) == ("mini", "tiny", "bytes", 1e-3, False)
    assert (cfg.grokfast, cfg.filter, cfg.window) == (True, "ma", 7)


def test_a_flag_overrides_the_environment_which_overrides_the_file_which_overrides_the_default(
        captured, capsys, monkeypatch, tmp_path):
    # click's order of sources: the command line, then HLB_GPT_* variables, then the file (its default map).
    config = write(tmp_path / "run.toml", "lr = 1e-3\nweight_decay = 0.2\nwarmup_steps = 7\n")
    monkeypatch.setenv("HLB_GPT_LR", "3e-3")
    monkeypatch.setenv("HLB_GPT_WEIGHT_DECAY", "0.3")
    code, _, err = run_main(TINY + ["--config", str(config), "--lr", "5e-3", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    [cfg] = captured
    assert cfg.lr == 5e-3  # flag over environment and file
    assert cfg.weight_decay == 0.3  # environment over file
    assert cfg.warmup_steps == 7  # file over the preset's default (100)
    assert cfg.grad_accum == 1  # neither: the default


def test_the_config_file_itself_can_come_from_the_environment(captured, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HLB_GPT_CONFIG", str(write(tmp_path / "run.toml", "warmup_steps = 9\n")))
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert [c.warmup_steps for c in captured] == [9]


@pytest.mark.parametrize("alpha", ["[0.8, 0.9]", '"0.8,0.9"'])
def test_lists_in_the_file_make_a_grid_as_comma_lists_do_on_the_command_line(captured, capsys, tmp_path, alpha):
    config = write(tmp_path / "grid.toml", f"grokfast = true\nbaseline = true\nalpha = {alpha}\nseed = [0, 1]\n"
                                           "gain = [1, 5]\n")
    code, _, err = run_main(TINY + ["--config", str(config), "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    filtered = {(c.alpha, c.gain, c.seed) for c in captured if c.grokfast}
    assert filtered == {(a, g, s) for a in (0.8, 0.9) for g in (1.0, 5.0) for s in (0, 1)}
    assert all(isinstance(c.gain, float) for c in captured)  # as `--gain 1,5` gives them
    assert sorted(c.seed for c in captured if not c.grokfast) == [0, 1]


def test_a_flag_replaces_a_list_of_the_file(captured, capsys, tmp_path):
    config = write(tmp_path / "grid.toml", "seed = [0, 1, 2]\n")
    code, _, err = run_main(TINY + ["--config", str(config), "--seed", "4", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert [c.seed for c in captured] == [4]


@pytest.mark.parametrize("text, name, expected", [
    (None, "missing.toml", "does not exist"),
    ("depth = 4\n[oops\n", "bad.toml", "not TOML"),
    ("\x89PNG\x00\x01", "image.toml", "not TOML"),
    ("{depth: 4}", "bad.json", "not JSON"),
    ("[1, 2]", "list.json", "must hold a table of settings"),
    ("lrr = 1e-3\n", "typo.toml", "unknown setting lrr; did you mean lr"),
    ("warmup = 5\n", "typo.toml", "unknown setting warmup; did you mean warmup_steps"),
    ("resume = 'runs/x'\n", "resume.toml", "unknown setting resume"),
    ('depth = "four"\n', "type.toml", "depth"),
    ("depth = 4.5\n", "type.toml", "depth = 4.5: expected an integer"),
    ("lr = true\n", "type.toml", "lr = True: expected a number"),
    ('grokfast = "yes"\n', "type.toml", "grokfast = 'yes': expected true or false"),
    ('seed = [0, "x"]\n', "type.toml", "seed"),
    ("eval_tokens = [8193, 16385]\n", "type.toml", "eval_tokens takes one value"),
    ("[model]\ndepth = 4\n", "table.toml", "unknown setting model"),
    ("[lr]\nbase = 1e-3\n", "table.toml", "lr = {'base': 0.001}: expected a number"),
    ('filter = "kalman"\n', "choice.toml", "kalman"),
    ("alpha = 1.5\ngrokfast = true\n", "range.toml", "--alpha must be in [0, 1)"),
    ("weight_decay = 0.1\nweight-decay = 0.2\n", "twice.toml", "weight_decay is given twice"),
    ('{"lr": 0.001, "lr": 0.002}', "twice.json", "lr is given twice"),
    ("seed = []\n", "empty.toml", "seed = []: give at least one value"),
    ('seed = ""\n', "empty.toml", "seed"),
    ("lr = nan\n", "nan.toml", "--lr must be a positive number"),
    ("lr = 1979-05-27\n", "date.toml", "lr = datetime.date(1979, 5, 27): expected a number"),
])
def test_a_bad_config_file_is_refused_in_one_line(captured, capsys, tmp_path, text, name, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    code, _, err = run_main(TINY + ["--config", str(path), "--out", str(tmp_path / "s")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("Error: ") and expected in err, err
    assert not captured and not (tmp_path / "s").exists()


def test_toml_on_a_python_without_tomllib_is_refused_in_one_line_and_json_still_reads(
        captured, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10: no tomllib
    code, _, err = run_main(TINY + ["--config", str(write(tmp_path / "a.toml", "lr = 1e-3\n"))], capsys)
    assert code == 2 and err.count("\n") == 1 and "Python 3.11" in err and "JSON" in err, err
    code, _, err = run_main(TINY + ["--config", str(write(tmp_path / "a.json", '{"lr": 0.001}')),
                                    "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert [c.lr for c in captured] == [1e-3]


def test_what_a_config_json_records_besides_the_settings_is_ignored(captured, capsys, tmp_path):
    recorded = {"lr": 1e-3, "clip": None, "data_source": "bundled mini", "checkpoint_cadence": {"epochs": 1.0},
                "resolved_device": "cpu", "resolved_precision": "fp32", "resolved_attention": "sdpa", "world_size": 1,
                "n_params": 1234, "train_tokens": 99, "text_sha256": {"train": "ab", "valid": "cd"},
                "versions": {"hlb_gpt": "0", "torch": "2", "python": "3"}, "init_checkpoint": "x", "init_step": 3,
                "init_sha256": "ef", "modular": {"p": 97}}
    config = write(tmp_path / "config.json", json.dumps(recorded))
    code, _, err = run_main(TINY + ["--config", str(config), "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert [(c.lr, c.clip) for c in captured] == [(1e-3, None)]  # JSON null: the setting's default


def _without_time(rows: list[dict]) -> list[dict]:
    """The rows without their timings (time_s, tokens_per_s)."""
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


@pytest.mark.slow
def test_a_run_s_config_json_given_back_with_config_reproduces_the_run(capsys, tmp_path, one_thread):
    cache = tmp_path / "cache"
    first = ["--grokfast", "--alpha", "0.9", "--gain", "0.5"]
    sizes = [a for k, v in TINY_LM.items() if k not in ("dataset", "preset", "tokenizer")
             for a in (f"--{k.replace('_', '-')}", str(v))]
    code, _, err = run_main(TINY + sizes + first + ["--data-cache", str(cache), "--out", str(tmp_path / "a"), "-q"],
                            capsys)
    assert code == 0, err
    [run_a] = [p for p in (tmp_path / "a").iterdir() if (p / "config.json").is_file()]
    code, _, err = run_main(["--config", str(run_a / "config.json"), "--out", str(tmp_path / "b"), "-q"], capsys)
    assert code == 0, err
    [run_b] = [p for p in (tmp_path / "b").iterdir() if (p / "config.json").is_file()]
    assert run_b.name == run_a.name == "ema-a0.9-g0.5-s0"
    a, b = read_run(run_a), read_run(run_b)
    assert a.config == b.config  # every setting and every recorded entry (same machine, same versions)
    assert _without_time(a.metrics) == _without_time(b.metrics)
    assert len(a.metrics) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("changes", [
    dict(optimizer="muon", checkpoint_every="30m"),
    dict(optimizer="grokadamw", checkpoint_every=2.0, clip=1.0),
    dict(task="modular"),
    dict(finetune=True),
])
def test_every_kind_of_run_s_config_json_reads_back_as_its_settings(captured, capsys, tmp_path, one_thread, changes):
    from hlb_gpt.config import RunConfig
    from tiny_runs import train_tiny

    if changes.pop("finetune", False):
        base = train_tiny(tmp_path / "base", tmp_path / "cache")
        changes = dict(init_from=str(base.resolve()), lora_rank=2, train_only="norms")
    run = train_tiny(tmp_path / "run", tmp_path / "cache", **changes)
    saved = read_run(run).config
    code, _, err = run_main(["--config", str(run / "config.json"), "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err
    assert [c.to_dict() for c in captured] == [RunConfig.from_dict(saved).to_dict()]
