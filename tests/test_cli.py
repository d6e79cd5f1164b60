import subprocess
import sys

import pytest

from hlb_gpt.cli import main

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
    ["--checkpoint-every", "abc"],
    ["--checkpoint-every", "-2m"],
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
