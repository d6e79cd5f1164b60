"""--eval-test: the test split, evaluated once at the end of a completed run, into summary.json."""

import json
import math

import pytest

from hlb_gpt.config import ConfigError, RunConfig, check_resumable
from hlb_gpt.data import load_split_texts
from hlb_gpt.train import train
from tiny_runs import TINY, TINY_LM, run_main, train_tiny

LN2 = math.log(2)


@pytest.fixture(scope="module")
def texts():
    return load_split_texts("mini")


def data_dir(root, texts, test=None, valid_chars=20_000):
    """A --data-dir holding mini's training text, a short validation text and, if given, a test text."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wiki.train.raw").write_text(texts["train"], encoding="utf-8", newline="")
    (root / "wiki.valid.raw").write_text(texts["valid"][:valid_chars], encoding="utf-8", newline="")
    if test is not None:
        (root / "wiki.test.raw").write_text(test, encoding="utf-8", newline="")
    return str(root)


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_the_test_split_is_evaluated_whole_at_the_end_not_cut_to_eval_tokens(tmp_path, texts):
    test_text = texts["valid"][20_000:50_000]
    folder = data_dir(tmp_path / "data", texts, test=test_text)
    run = train_tiny(tmp_path / "run", tmp_path / "cache", data_dir=folder, eval_test=True, max_steps=3)
    summary = summary_of(run)
    n_tokens = len(test_text.encode("utf-8"))  # the bytes tokenizer: one token a byte
    assert summary["test_tokens"] == (n_tokens - 1) // 32 * 32 > TINY_LM["eval_tokens"]
    assert summary["test_bpb"] == summary["test_loss"] / LN2 and "test_ppl" not in summary
    assert math.isfinite(summary["test_loss"])
    assert not any(k.startswith("test") for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   for k in row)


def test_the_test_loss_of_a_test_split_equal_to_the_validation_split_is_the_final_val_loss(tmp_path, texts):
    folder = data_dir(tmp_path / "data", texts, test=texts["valid"][:20_000])
    run = train_tiny(tmp_path / "run", tmp_path / "cache", data_dir=folder, eval_test=True, eval_tokens=0,
                     max_steps=3)
    summary = summary_of(run)
    assert summary["test_loss"] == summary["final_val_loss"]


def test_a_run_without_eval_test_records_no_test_loss(tmp_path, texts):
    folder = data_dir(tmp_path / "data", texts, test=texts["valid"][:20_000])
    run = train_tiny(tmp_path / "run", tmp_path / "cache", data_dir=folder, max_steps=2)
    assert not any(k.startswith("test") for k in summary_of(run))


def test_eval_test_may_be_added_when_a_run_is_extended_and_evaluates_at_the_new_end(tmp_path, texts):
    folder = data_dir(tmp_path / "data", texts, test=texts["valid"][20_000:40_000])
    run = train_tiny(tmp_path / "run", tmp_path / "cache", data_dir=folder, max_steps=2, checkpoint_every=1)
    saved = json.loads((run / "config.json").read_text())
    cfg = RunConfig(**TINY_LM, data_cache=str(tmp_path / "cache")).replace(data_dir=folder, eval_test=True,
                                                                           max_steps=4, checkpoint_every=1)
    check_resumable(cfg, saved, run)  # bookkeeping: it changes nothing the training measures
    summary = train(cfg, run, progress=False, resume=True)
    assert summary["status"] == "completed" and summary["steps"] == 4 and math.isfinite(summary["test_loss"])
    assert summary_of(run)["test_loss"] == summary["test_loss"]


def test_eval_test_on_mini_is_refused_in_one_line_since_its_training_text_is_wikitext2_s_test_split(tmp_path, capsys):
    code, out, err = run_main([*TINY, "--eval-test", "--max-steps", "1", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("Error: --eval-test") and "mini" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("test", [None, ""], ids=["missing", "empty"])
def test_eval_test_on_a_data_dir_without_a_test_text_is_refused_in_one_line(tmp_path, texts, capsys, test):
    folder = data_dir(tmp_path / "data", texts, test=test)
    code, out, err = run_main([*TINY, "--data-dir", folder, "--eval-test", "--max-steps", "1", "--out",
                               str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("Error: --eval-test") and "wiki.test.raw" in err
    assert not (tmp_path / "runs").exists()


def test_a_test_split_too_short_for_one_window_is_refused_before_training(tmp_path, texts):
    folder = data_dir(tmp_path / "data", texts, test="too short")
    with pytest.raises(ConfigError, match="--eval-test: the test split has 9 tokens, fewer than --seq-len"):
        train_tiny(tmp_path / "run", tmp_path / "cache", data_dir=folder, eval_test=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_test_is_refused_for_the_modular_task(tmp_path, capsys):
    code, out, err = run_main(["--task", "modular", "--eval-test", "--max-steps", "1", "--out",
                               str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("Error: --eval-test")


def test_the_hub_datasets_load_their_test_split_under_the_hub_s_name(monkeypatch):
    """The hub is out of reach here: the loader is given a stand-in `datasets` that records what it was asked."""
    import sys
    import types

    asked = []

    def load_dataset(repo, config, split):
        asked.append((repo, config, split))
        return {"text": [f"{split} line\n", ""]}

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    texts = load_split_texts("wikitext-2", test=True)
    assert ("Salesforce/wikitext", "wikitext-2-raw-v1", "test") in asked
    assert texts["test"] == "test line\n \n"
    asked.clear()
    assert "test" not in load_split_texts("wikitext-103") and all(split != "test" for *_, split in asked)
