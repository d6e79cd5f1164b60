import json

import pytest

from hlb_gpt.records import METRIC_KEYS, RunWriter, atomic_write_json, is_run_dir, read_run


def _row(**overrides):
    row = {k: 0.0 for k in METRIC_KEYS}
    row.update(overrides)
    return row


def test_run_folder_round_trips_config_metrics_and_summary(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"seed": 1})
    writer.rewrite_metrics([])
    writer.append_metrics(_row(step=1, val_loss=2.5))
    writer.append_metrics(_row(step=2, val_loss=2.0))
    writer.write_summary({"status": "completed", "best_val_loss": 2.0})
    run = read_run(tmp_path / "run")
    assert is_run_dir(tmp_path / "run")
    assert run.config == {"seed": 1}
    assert [r["step"] for r in run.metrics] == [1, 2]
    assert run.status == "completed"


def test_each_metrics_row_is_on_disk_as_soon_as_it_is_appended(tmp_path):
    writer = RunWriter(tmp_path)
    writer.rewrite_metrics([])
    writer.append_metrics(_row(step=7))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 7


def test_non_finite_numbers_are_written_as_null_so_the_files_stay_valid_json(tmp_path):
    writer = RunWriter(tmp_path)
    writer.rewrite_metrics([])
    writer.append_metrics(_row(val_loss=float("nan"), train_loss=float("inf")))
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["val_loss"] is None and row["train_loss"] is None


def test_a_metrics_row_missing_a_documented_key_is_refused(tmp_path):
    writer = RunWriter(tmp_path)
    with pytest.raises(ValueError, match="ema_ratio"):
        writer.append_metrics({k: 0 for k in METRIC_KEYS if k != "ema_ratio"})


def test_summary_status_must_be_a_known_status(tmp_path):
    with pytest.raises(ValueError, match="status"):
        RunWriter(tmp_path).write_summary({"status": "done"})


def test_a_row_cut_short_by_a_kill_is_dropped_and_earlier_rows_kept(tmp_path):
    writer = RunWriter(tmp_path)
    writer.write_config({})
    writer.rewrite_metrics([])
    writer.append_metrics(_row(step=1))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 0.5, "st')
    assert [r["step"] for r in read_run(tmp_path).metrics] == [1]


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_json(tmp_path / "summary.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
