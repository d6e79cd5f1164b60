"""`hlb-gpt status` on run folders whose records are damaged: one line per run, never a traceback."""

import json
import re

import pytest

from tiny_runs import run_main

GOOD_ROWS = [{"epoch": 0.0, "step": 0, "val_loss": 5.5}, {"epoch": 0.5, "step": 10, "val_loss": 3.25}]


def a_sweep(root, metrics_tail="", summary=None):
    """A sweep folder with one completed run whose metrics.jsonl ends with `metrics_tail`."""
    run = root / "baseline-s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": 0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD_ROWS) + metrics_tail)
    (run / "summary.json").write_text(summary if summary is not None else json.dumps({"status": "completed"}))
    return root


def status_lines(root, capsys):
    code, out, err = run_main(["status", str(root)], capsys)
    assert "Traceback" not in err and code == 0, err
    return out.splitlines()


@pytest.mark.parametrize("line", ["[1, 2]", '{"epoch": "x"}', '{"epoch": 1.0, "val_loss": "low"}', '"text"', "null"],
                         ids=["list", "text-epoch", "text-val-loss", "string", "null"])
def test_a_metrics_line_that_is_json_but_not_a_row_is_passed_over(tmp_path, capsys, line):
    # compare skips such lines; status shows the last row that is one
    lines = status_lines(a_sweep(tmp_path, line + "\n"), capsys)
    row = lines[1]
    if line == '{"epoch": 1.0, "val_loss": "low"}':  # a row with an epoch: its epoch counts, its loss is none
        assert re.search(r"completed\s+1\s+-$", row), row
    else:
        assert re.search(r"completed\s+0\.5\s+3\.2500$", row), row
    assert lines[-1] == "1 run: 1 completed"


def test_a_summary_that_is_json_but_not_an_object_is_unreadable(tmp_path, capsys):
    lines = status_lines(a_sweep(tmp_path, summary="[1, 2]"), capsys)
    assert "unreadable (summary.json is not an object)" in lines[1]
