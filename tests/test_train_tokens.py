"""--train-tokens N: a run trains on the first N tokens of the training split (a data-size ablation). It is a
setting of the run like any other (a grid key, its identity, its folder name when it varies), config.json records
the tokens and the sha256 of the text trained on, and an epoch is a pass over those N tokens."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from hlb_gpt import distributed
from hlb_gpt.checkpoint import list_checkpoints, load_checkpoint
from hlb_gpt.compare import group_key
from hlb_gpt.config import ConfigError, RunConfig, check_resumable
from hlb_gpt.data import Data, first_tokens, get_tokenizer, load_data, load_split_texts
from hlb_gpt.records import read_run
from hlb_gpt.sweep import expand_grid, run_folder_name, run_sweep, varying
from hlb_gpt.tasks.lm import LanguageModel
from hlb_gpt.train import train
from tiny_runs import TINY, TINY_LM, run_main

MINI_BYTES_TRAIN = 1_290_590  # tokens of mini's training split with --tokenizer bytes
SMALL = {k: v for k, v in TINY_LM.items() if k != "max_steps"}  # 4 x 32 = 128 tokens a step
SMALL_FLAGS = [a for k, v in SMALL.items() if k not in ("dataset", "preset", "tokenizer")
               for a in (f"--{k.replace('_', '-')}", str(v))]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def numbers(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("time_s", "tokens_per_s")} for row in read_run(run_dir).metrics]


@pytest.fixture
def planned(monkeypatch):
    """The run folders a command would train, by name, without training them."""
    runs: dict[str, RunConfig] = {}

    def run_sweep(configs, out, vary=(), **kw):
        runs.update({run_folder_name(cfg, vary): cfg for cfg in configs})
        return []

    monkeypatch.setattr("hlb_gpt.sweep.run_sweep", run_sweep)
    return runs


# --- a setting of the run --------------------------------------------------------------------------------------


def test_a_train_tokens_list_makes_one_run_per_value_each_in_a_folder_named_for_it(planned, capsys, tmp_path):
    code, _, err = run_main(TINY + ["--train-tokens", "4096,8192", "--out", str(tmp_path / "s"),
                                    "--data-cache", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert {name: cfg.train_tokens_limit for name, cfg in planned.items()} == {
        "baseline-train4096-s0": 4096, "baseline-train8192-s0": 8192}


def test_train_tokens_cross_with_the_other_grid_settings_and_pair_each_filter_with_its_own_baseline():
    grid = {"train_tokens_limit": [4096, 8192], "alpha": [0.8, 0.9], "seed": [0, 1]}
    base = RunConfig(**SMALL, grokfast=True, **{k: v[0] for k, v in grid.items()})
    configs = expand_grid(base, grid, grokfast=True, baseline=True)
    names = [run_folder_name(c, varying(grid)) for c in configs]
    assert len(configs) == len(set(names)) == 2 * 3 * 2
    assert "ema-a0.9-g2-train8192-s1" in names and "baseline-train4096-s0" in names
    assert len({group_key(c.to_dict()) for c in configs}) == 6  # a configuration per (arm, N), seeds paired


def test_unset_train_tokens_leave_the_run_its_folder_name_and_old_records_as_they_were():
    cfg = RunConfig(**SMALL)
    assert cfg.train_tokens_limit is None
    assert run_folder_name(cfg, varying({"seed": [0, 1]})) == "baseline-s0"
    recorded_before = {k: v for k, v in cfg.to_dict().items() if k != "train_tokens_limit"}
    check_resumable(cfg, recorded_before, "old-run")  # an old run folder continues
    assert group_key(recorded_before) == group_key(cfg.to_dict())  # and compares with new runs as one
    assert group_key(cfg.to_dict()) != group_key(cfg.replace(train_tokens_limit=4096).to_dict())


def test_a_run_is_continued_only_with_its_own_train_tokens(tmp_path):
    cfg = RunConfig(**SMALL, train_tokens_limit=4096)
    for other in (8192, None):
        with pytest.raises(ConfigError, match=rf"--train-tokens: {other} vs 4096"):
            check_resumable(cfg.replace(train_tokens_limit=other), cfg.to_dict(), "run")
    train(cfg.replace(max_steps=2, data_cache=str(tmp_path / "cache")), tmp_path / "sweep" / "baseline-s0",
          progress=False)
    with pytest.raises(ConfigError, match="--train-tokens: 8192 vs 4096"):  # the same folder name, other text
        run_sweep([cfg.replace(max_steps=2, train_tokens_limit=8192, data_cache=str(tmp_path / "cache"))],
                  tmp_path / "sweep", progress=False)


def test_resume_with_another_train_tokens_is_refused_in_one_line(tmp_path, capsys):
    cfg = RunConfig(**SMALL, train_tokens_limit=4096, max_steps=2, data_cache=str(tmp_path / "cache"))
    train(cfg, tmp_path / "run", progress=False)
    code, _, err = run_main(["--resume", str(tmp_path / "run"), "--train-tokens", "65536"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--train-tokens: 65536 vs 4096" in err, err


def test_resume_checks_its_flags_against_the_run_s_own_settings_not_the_default_preset_s(tmp_path, capsys):
    # 256 tokens are less than one step of the default preset (64 x 1024), but two steps of this run's (4 x 32).
    cfg = RunConfig(**SMALL, train_tokens_limit=4096, max_steps=2, data_cache=str(tmp_path / "cache"))
    train(cfg, tmp_path / "run", progress=False)
    code, _, err = run_main(["--resume", str(tmp_path / "run"), "--train-tokens", "256"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--train-tokens: 256 vs 4096" in err, err
    code, _, err = run_main(["--resume", str(tmp_path / "run"), "--train-tokens", "4096", "--max-steps", "3",
                             "--quiet"], capsys)
    assert code == 0, err
    assert read_run(tmp_path / "run").summary["steps"] == 3


def test_train_tokens_come_from_the_environment_and_from_a_config_file(planned, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HLB_GPT_TRAIN_TOKENS", "8192")
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "a"), "--data-cache", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert [c.train_tokens_limit for c in planned.values()] == [8192]
    monkeypatch.delenv("HLB_GPT_TRAIN_TOKENS")
    planned.clear()
    toml = tmp_path / "run.toml"
    toml.write_text("train-tokens = [4096, 8192]\n")  # a file names settings as the flags do
    code, _, err = run_main(TINY + ["--config", str(toml), "--out", str(tmp_path / "b"),
                                    "--data-cache", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    assert sorted(c.train_tokens_limit for c in planned.values()) == [4096, 8192]


def test_a_run_s_config_json_given_back_keeps_its_train_tokens_not_the_recorded_count(planned, capsys, tmp_path):
    cfg = RunConfig(**SMALL, train_tokens_limit=4096, max_steps=1, data_cache=str(tmp_path / "cache"))
    train(cfg, tmp_path / "limited", progress=False)
    train(cfg.replace(train_tokens_limit=None), tmp_path / "whole", progress=False)
    for run, expected in (("limited", 4096), ("whole", None)):
        planned.clear()
        code, _, err = run_main(["--config", str(tmp_path / run / "config.json"), "--out", str(tmp_path / "again")],
                                capsys)
        assert code == 0, err
        assert [c.train_tokens_limit for c in planned.values()] == [expected]


# --- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--train-tokens", "0"], "--train-tokens must be"),
    (["--train-tokens", "-4096"], "--train-tokens must be"),
    (["--train-tokens", "4096.5"], "--train-tokens"),
    (["--train-tokens", "many"], "--train-tokens"),
    (["--train-tokens", "4095"], "one step's batch"),  # tiny: 16 sequences of 256 tokens
    (["--train-tokens", "4096,100", "--grokfast"], "one step's batch"),  # any value of a grid
    (["--batch-size", "1", "--train-tokens", "256"], "--seq-len + 1 = 257"),
    (["--train-tokens", f"{MINI_BYTES_TRAIN + 1}"], f"the {MINI_BYTES_TRAIN:,} tokens of the training split"),
    (["--train-tokens", f"4096,{10 ** 12}"], "tokens of the training split"),  # before the first run trains
    (["--task", "modular", "--train-tokens", "4096"], "--task modular"),
])
def test_bad_train_tokens_are_refused_in_one_line_before_anything_is_written(args, expected, capsys, tmp_path):
    code, _, err = run_main(TINY + args + ["--out", str(tmp_path / "s"), "--data-cache", str(tmp_path / "cache")],
                            capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("Error: ") and expected in err, err
    assert not (tmp_path / "s").exists()


def test_a_config_built_in_python_refuses_a_float_or_a_bool_for_train_tokens():
    for value in (4096.0, True):
        with pytest.raises(ConfigError, match="--train-tokens must be an integer"):
            RunConfig(**SMALL, train_tokens_limit=value)


# --- the text trained on ---------------------------------------------------------------------------------------


def language_model(cfg: RunConfig) -> LanguageModel:
    return LanguageModel(cfg, torch.device("cpu"), distributed.from_env(), compile=False)


def test_the_sampler_draws_from_the_first_n_tokens_alone_and_records_their_text(tmp_path):
    cfg = RunConfig(**SMALL, train_tokens_limit=1000, data_cache=str(tmp_path / "cache"))
    task, whole = language_model(cfg), language_model(cfg.replace(train_tokens_limit=None))
    assert task.n_train == 1000 and torch.equal(task.sampler.tokens, whole.sampler.tokens[:1000])
    texts = {split: text.encode("utf-8") for split, text in load_split_texts("mini").items()}
    assert task.text_sha256 == {"train": sha256(texts["train"][:1000]), "valid": sha256(texts["valid"])}
    assert whole.text_sha256["train"] == sha256(texts["train"])
    # The whole split asked for by its size is the text of a run without the setting.
    assert language_model(cfg.replace(train_tokens_limit=MINI_BYTES_TRAIN)).text_sha256 == whole.text_sha256


def test_the_sha256_of_n_gpt2_tokens_is_that_of_the_text_they_spell(tmp_path):
    (tmp_path / "text").mkdir()
    text = " = Héllo = \n Some words , some more ; numbers 1 @,@ 234 and ünïcode text . \n" * 20
    for split in ("wiki.train.raw", "wiki.valid.raw"):
        (tmp_path / "text" / split).write_text(text, encoding="utf-8")
    gpt2 = get_tokenizer("gpt2")
    data = load_data("mini", gpt2, tmp_path / "cache", tmp_path / "text")
    for n in (1, 7, 100, len(data.tokens["train"])):
        cut = first_tokens(data, n, gpt2)
        spelled = gpt2.decode_bytes(data.tokens["train"][:n])
        assert text.encode("utf-8").startswith(spelled) and len(cut.tokens["train"]) == n
        assert cut.text_sha256 == {"train": sha256(spelled), "valid": data.text_sha256["valid"]}
    assert first_tokens(data, None, gpt2) is data


def test_first_tokens_refuses_more_tokens_than_the_split_has():
    data = Data({"train": torch.arange(10, dtype=torch.int32), "valid": torch.arange(5, dtype=torch.int32)},
                {"train": "a", "valid": "b"})
    with pytest.raises(ConfigError, match="--train-tokens 11 is more than the 10 tokens of the training split"):
        first_tokens(data, 11, get_tokenizer("bytes"))


def test_an_epoch_is_a_pass_over_the_first_n_tokens(tmp_path):
    # 512 tokens are 4 steps of 128: 3 epochs are 12 steps, evaluated every half epoch.
    cfg = RunConfig(**SMALL, train_tokens_limit=512, epochs=3.0, evals_per_epoch=2, data_cache=str(tmp_path / "c"))
    summary = train(cfg, tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    assert summary["steps"] == 12 and summary["epochs"] == 3.0
    assert [(row["step"], row["epoch"]) for row in run.metrics] == [(2 * i, i / 2) for i in range(7)]
    assert run.config["train_tokens"] == 512 and run.config["train_tokens_limit"] == 512
    assert run.config["text_sha256"]["train"] == sha256(load_split_texts("mini")["train"].encode("utf-8")[:512])


def test_a_run_on_the_first_n_tokens_killed_and_resumed_trains_on_the_same_text_to_the_same_metrics(tmp_path, caplog):
    cfg = RunConfig(**SMALL, train_tokens_limit=1024, epochs=4.0, evals_per_epoch=2, checkpoint_every=1.0,
                    keep_checkpoints=10, data_cache=str(tmp_path / "cache"))  # 8 steps an epoch
    train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "killed", progress=False)
    before = read_run(tmp_path / "killed").config
    # As a kill -9 right after the checkpoint of epoch 2 leaves it: no summary, no later checkpoint, rows past it.
    (tmp_path / "killed" / "summary.json").unlink()
    for path in list_checkpoints(tmp_path / "killed"):
        if int(path.stem.rpartition("-")[2]) > 16:
            path.unlink()
    assert load_checkpoint(list_checkpoints(tmp_path / "killed")[-1])["text_sha256"] == before["text_sha256"]
    with caplog.at_level("INFO"):
        summary = train(cfg, tmp_path / "killed", progress=False, resume=True)
    assert "resumed at step 16" in caplog.text
    assert summary["status"] == "completed" and summary["steps"] == 32
    after = read_run(tmp_path / "killed").config
    assert after["text_sha256"] == before["text_sha256"] == read_run(tmp_path / "whole").config["text_sha256"]
    assert after["train_tokens"] == 1024
    assert numbers(tmp_path / "killed") == numbers(tmp_path / "whole")
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["epochs"] == 4.0
