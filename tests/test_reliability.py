"""Long runs that survive: checkpoints, bit-exact resume, signals, divergence, unsafe checkpoints, torchrun."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hlb_gpt import checkpoint as ckpt
from hlb_gpt.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.records import read_run
from hlb_gpt.sweep import expand_grid, run_sweep
from hlb_gpt.train import train

TIME_KEYS = {"time_s", "tokens_per_s"}
SMALL = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--depth", "1", "--width", "32",
         "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "1024", "-q"]


def numbers(run_dir):
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in read_run(run_dir).metrics]


def hlb(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "hlb_gpt", *args], capture_output=True, text=True, **kwargs)


def start(args):
    return subprocess.Popen([sys.executable, "-m", "hlb_gpt", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be stopped: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("variant, name", [
    ([], "baseline-s0"),
    (["--grokfast", "--filter", "ma", "--window", "5"], "ma-w5-g2-s0"),
    (["--optimizer", "grokadamw", "--alpha", "0.9", "--gain", "0.5"], "grokadamw-a0.9-g0.5-s0"),
])
def test_a_killed_run_resumes_to_the_same_metrics_as_an_uninterrupted_one(tmp_path, variant, name):
    args = SMALL + variant + ["--epochs", "0.006", "--evals-per-epoch", "2000", "--checkpoint-every", "0.001",
                              "--data-cache", str(tmp_path / "cache")]
    assert hlb(args + ["--out", str(tmp_path / "full")]).returncode == 0
    run = tmp_path / "killed" / name
    proc = start(args + ["--out", str(tmp_path / "killed")])
    wait_for(lambda: len(list_checkpoints(run)) >= 1 and read_run(run).metrics, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_run(run).summary is None  # killed mid-run, before its end
    killed_at = len(read_run(run).metrics)
    rerun = hlb(args + ["--out", str(tmp_path / "killed")])  # the same command continues the run
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed at step" in rerun.stderr
    assert read_run(run).status == "completed"
    assert numbers(run) == numbers(tmp_path / "full" / name)
    assert killed_at < len(numbers(run))


@pytest.mark.slow
def test_sigint_checkpoints_marks_interrupted_and_resumes_cleanly(tmp_path):
    args = SMALL + ["--epochs", "0.006", "--evals-per-epoch", "2000", "--checkpoint-every", "1",
                    "--data-cache", str(tmp_path / "cache"), "--grokfast"]
    assert hlb(args + ["--out", str(tmp_path / "full")]).returncode == 0
    run = tmp_path / "stopped" / "ema-a0.98-g2-s0"
    proc = start(args + ["--out", str(tmp_path / "stopped")])
    wait_for(lambda: len(read_run(run).metrics) >= 3 if (run / "config.json").exists() else False, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    summary = read_run(run).summary
    assert summary["status"] == "interrupted" and "SIGINT" in summary["error"]
    saved = load_checkpoint(latest_checkpoint(run))
    assert saved["loop"]["step"] == summary["steps"]
    resumed = hlb(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    assert read_run(run).status == "completed"
    assert numbers(run) == numbers(tmp_path / "full" / "ema-a0.98-g2-s0")


def test_resume_refuses_a_command_with_other_settings(tmp_path, capsys):
    from hlb_gpt.cli import main

    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                    epochs=0.0005, eval_tokens=1024, data_cache=str(tmp_path / "cache"))
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(tmp_path / "run"), "--width", "64", "--lr", "0.1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--width: 64 vs 32" in err and "--lr: 0.1 vs 0.002" in err


def test_a_sweep_refuses_to_continue_an_unfinished_run_under_other_settings(tmp_path):
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                    epochs=0.0005, eval_tokens=1024, data_cache=str(tmp_path / "cache"))
    train(cfg, tmp_path / "sweep" / "baseline-s0", progress=False)
    summary = tmp_path / "sweep" / "baseline-s0" / "summary.json"
    summary.write_text(summary.read_text().replace('"completed"', '"interrupted"'))
    with pytest.raises(ConfigError, match="--lr"):
        run_sweep([cfg.replace(lr=0.5)], tmp_path / "sweep", progress=False)


def test_resume_of_a_folder_that_is_not_a_run_is_bad_input(tmp_path, capsys):
    from hlb_gpt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(tmp_path)])
    assert exc.value.code == 2 and "not a run folder" in capsys.readouterr().err


def test_a_huge_learning_rate_diverges_and_the_sweep_finishes_the_other_runs(tmp_path):
    base = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                     epochs=0.002, evals_per_epoch=2000, eval_tokens=1024, data_cache=str(tmp_path / "cache"))
    configs = expand_grid(base, {"seed": [0, 1]}, grokfast=False, baseline=False)
    configs.insert(1, configs[0].replace(lr=1e6, seed=7))
    results = run_sweep(configs, tmp_path / "sweep", progress=False)
    assert [r.status for r in results] == ["completed", "diverged", "completed"]
    assert "at step" in results[1].summary["error"]


def test_checkpoints_are_pruned_to_the_newest_few(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000003.pt", "step-000000004.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path)) == {"step": 4}


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep=2)

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000001.pt"]
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["w"], torch.ones(3))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["HLB_TEST_MARKER"]),))


def test_a_checkpoint_holding_a_pickled_callable_is_refused_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("HLB_TEST_MARKER", str(marker))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"model": _Payload()}, tmp_path / "checkpoints" / "step-000000001.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(latest_checkpoint(tmp_path))
    assert not marker.exists()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    save_checkpoint(tmp_path, 1, {"rng": state}, keep=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


@pytest.mark.slow
def test_torchrun_with_two_cpu_ranks_matches_one_process_and_keeps_filters_identical(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun is not on PATH")
    args = SMALL + ["--epochs", "0.002", "--evals-per-epoch", "2000", "--grokfast", "--alpha", "0.9", "--gain", "1",
                    "--data-cache", str(tmp_path / "cache")]
    single = hlb(args + ["--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "hlb_gpt", *args,
                          "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.is_dir()) == ["ema-a0.9-g1-s0"]
    run = read_run(tmp_path / "ddp" / "ema-a0.9-g1-s0")
    assert run.config["world_size"] == 2
    checksums = run.summary["ddp"]["filter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    one = read_run(tmp_path / "single" / "ema-a0.9-g1-s0").metrics
    assert len(one) == len(run.metrics) >= 2
    assert one[0]["train_loss"] is None is run.metrics[0]["train_loss"]  # the evaluation before training
    for a, b in zip(one, run.metrics):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    for a, b in zip(one[1:], run.metrics[1:]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert ddp.stdout.count("completed") == 1  # one rank reports


@pytest.mark.slow
def test_torchrun_ranks_stay_in_step_through_a_time_cadence_only_rank_0_acts_on(tmp_path):
    # Each rank reads its own clock; only rank 0 saves, and saving holds no collective, so ranks that disagree
    # about the time cannot deadlock. 1 ms makes rank 0 checkpoint at every sync point.
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun is not on PATH")
    args = SMALL + ["--epochs", "0.002", "--evals-per-epoch", "2000", "--checkpoint-every", "0.001s",
                    "--keep-checkpoints", "100", "--data-cache", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "hlb_gpt", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    run = tmp_path / "ddp" / "baseline-s0"
    saved = [load_checkpoint(p)["loop"]["step"] for p in list_checkpoints(run)]
    evaluated = [row["step"] for row in read_run(run).metrics if row["step"] > 0]  # not the one before training
    assert set(evaluated) <= set(saved) and len(saved) > len(evaluated) >= 2
    assert read_run(run).config["checkpoint_cadence"] == {"epochs": 0.0, "seconds": 0.001}


def test_a_completed_run_asked_for_more_epochs_continues_where_it_stopped(tmp_path):
    base = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                     epochs=0.002, evals_per_epoch=2000, eval_tokens=1024, checkpoint_every=1.0,
                     data_cache=str(tmp_path / "cache"))
    run_sweep([base], tmp_path / "sweep", progress=False)
    short = numbers(tmp_path / "sweep" / "baseline-s0")
    results = run_sweep([base.replace(epochs=0.004)], tmp_path / "sweep", progress=False)
    assert results[0].status == "completed" and results[0].summary["epochs"] >= 0.004
    extended = numbers(tmp_path / "sweep" / "baseline-s0")
    assert extended[:len(short)] == short
    train(base.replace(epochs=0.004), tmp_path / "direct", progress=False)
    by_step = {r["step"]: r["val_loss"] for r in extended}
    assert all(by_step[r["step"]] == r["val_loss"] for r in numbers(tmp_path / "direct"))
    # and the same command again has nothing left to do
    assert run_sweep([base.replace(epochs=0.004)], tmp_path / "sweep", progress=False)[0].summary == results[0].summary


# ----------------------------------------------------------------------------------------------- extensions


@pytest.fixture
def one_thread():
    """Short CPU runs on a busy machine: one thread, or a thread waiting for a busy core slows every step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def tiny_run(tmp_path, **changes):
    """The SMALL command's config, with an evaluation at every step (so a run's rows do not depend on where an
    earlier, shorter run of it ended) and a checkpoint about every 10 steps; 0.002 epochs are 21 steps."""
    values = dict(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                  eval_tokens=1024, evals_per_epoch=20_000, checkpoint_every=0.001, data_cache=str(tmp_path / "cache"))
    return RunConfig(**{**values, **changes})


def folder_bytes(folder):
    """The run's records and checkpoints; its lock files, the history of which process tried it, aside."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.startswith("lock.")}


@pytest.mark.usefixtures("one_thread")
def test_an_extension_that_dies_mid_way_is_continued_not_taken_for_the_shorter_completed_run(
        tmp_path, monkeypatch, caplog):
    import hlb_gpt.train as train_module
    from hlb_gpt.records import RunWriter

    short, long = tiny_run(tmp_path, epochs=0.002), tiny_run(tmp_path, epochs=0.006)
    train(long, tmp_path / "direct", progress=False)
    run = tmp_path / "sweep" / "baseline-s0"
    assert run_sweep([short], tmp_path / "sweep", progress=False)[0].summary["steps"] == 21

    # The extension dies at step 35, after its checkpoint of step 31, the way a kill -9 leaves a run: whatever
    # it wrote up to there stays, and it writes nothing more (no summary).
    real_step, calls = train_module.optimizer_step, []

    def dies_at_step_35(*args, **kwargs):
        calls.append(1)
        if len(calls) == 35 - 21:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_module, "optimizer_step", dies_at_step_35)
        m.setattr(RunWriter, "write_summary", lambda self, summary: None)
        with pytest.raises(KeyboardInterrupt):
            run_sweep([long], tmp_path / "sweep", progress=False)
    killed = read_run(run)
    assert killed.summary is None and killed.status is None  # not the stale "completed" of the 21-step run
    assert killed.config["epochs"] == 0.006 and killed.metrics[-1]["step"] == 34
    assert int(latest_checkpoint(run).stem.rpartition("-")[2]) == 31

    with caplog.at_level("INFO", logger="hlb_gpt.sweep"):
        result = run_sweep([long], tmp_path / "sweep", progress=False)[0]
    assert "completed already" not in caplog.text
    assert result.status == "completed" and result.summary["steps"] == 61
    assert read_run(run).summary == result.summary
    assert numbers(run) == numbers(tmp_path / "direct")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("task", ["lm", "modular"])
def test_a_continued_run_has_no_summary_from_before_its_first_step(tmp_path, monkeypatch, task):
    import hlb_gpt.train as train_module

    if task == "lm":
        cfg = tiny_run(tmp_path, epochs=0.002)
        longer = cfg.replace(epochs=0.004)
    else:
        cfg = RunConfig(task="modular", depth=1, width=32, max_steps=10, device="cpu", checkpoint_every=1)
        longer = cfg.replace(max_steps=20)
    run = tmp_path / "sweep" / "baseline-s0"
    run_sweep([cfg], run.parent, progress=False)
    assert read_run(run).status == "completed"
    at_first_step = []
    real_step = train_module.optimizer_step

    def look(*args, **kwargs):
        if not at_first_step:
            at_first_step.append(read_run(run))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", look)
    assert run_sweep([longer], run.parent, progress=False)[0].status == "completed"
    continuing = at_first_step[0]
    assert continuing.summary is None  # while it trains, nothing says it completed
    assert (continuing.config["epochs"], continuing.config["max_steps"]) == (longer.epochs, longer.max_steps)
    assert read_run(run).status == "completed"


@pytest.mark.usefixtures("one_thread")
def test_a_request_shorter_than_a_runs_records_is_refused_in_one_line_and_the_folder_is_left_as_it_was(
        tmp_path, capsys):
    from hlb_gpt.cli import main

    run_sweep([tiny_run(tmp_path, epochs=0.004)], tmp_path / "sweep", progress=False)  # 41 steps
    run = tmp_path / "sweep" / "baseline-s0"
    before = folder_bytes(run)
    with pytest.raises(ConfigError, match=r"already went to step 41 \(epoch 0\.004066\), past the 21 steps of "
                                          r"--epochs 0\.002"):
        run_sweep([tiny_run(tmp_path, epochs=0.002)], tmp_path / "sweep", progress=False)
    with pytest.raises(ConfigError, match=r"step 41 .*past the 30 steps of --max-steps 30"):
        run_sweep([tiny_run(tmp_path, epochs=0.004, max_steps=30)], tmp_path / "sweep", progress=False)
    assert folder_bytes(run) == before

    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(run), "--epochs", "0.003"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "step 41" in err and "past the 31 steps of --epochs 0.003" in err
    assert folder_bytes(run) == before

    # An unfinished run (killed: no summary) is measured by its metrics and checkpoints alike.
    (run / "summary.json").unlink()
    before = folder_bytes(run)
    with pytest.raises(ConfigError, match="step 41"):
        run_sweep([tiny_run(tmp_path, epochs=0.002)], tmp_path / "sweep", progress=False)
    assert folder_bytes(run) == before
    # and the same length, or a longer one, is accepted
    assert run_sweep([tiny_run(tmp_path, epochs=0.004)], tmp_path / "sweep", progress=False)[0].status == "completed"


@pytest.mark.usefixtures("one_thread")
def test_a_modular_run_asked_for_fewer_steps_than_it_took_is_refused(tmp_path):
    cfg = RunConfig(task="modular", depth=1, width=32, max_steps=20, device="cpu", checkpoint_every=1)
    run_sweep([cfg], tmp_path, progress=False)
    before = folder_bytes(tmp_path / "baseline-s0")
    with pytest.raises(ConfigError, match=r"step 20 .*past the 10 steps of --max-steps 10"):
        run_sweep([cfg.replace(max_steps=10)], tmp_path, progress=False)
    assert folder_bytes(tmp_path / "baseline-s0") == before


@pytest.mark.usefixtures("one_thread")
def test_an_extension_that_fails_before_it_starts_is_reported_failed_and_the_completed_run_kept(tmp_path, monkeypatch):
    from hlb_gpt.tasks import lm

    short = tiny_run(tmp_path, epochs=0.002)
    run_sweep([short], tmp_path, progress=False)
    before = folder_bytes(tmp_path / "baseline-s0")

    def broken(*args, **kwargs):
        raise RuntimeError("no model today")

    monkeypatch.setattr(lm, "GPT", broken)
    result = run_sweep([short.replace(epochs=0.004)], tmp_path, progress=False)[0]
    assert result.status == "failed" and "no model today" in result.summary["error"]
    assert folder_bytes(tmp_path / "baseline-s0") == before  # still the completed 0.002-epoch run it was


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_an_extension_killed_with_sigkill_is_continued_by_the_same_command_to_a_direct_runs_metrics(tmp_path):
    short, long = tiny_run(tmp_path, epochs=0.002), tiny_run(tmp_path, epochs=0.006)
    train(long, tmp_path / "direct", progress=False)
    run = tmp_path / "sweep" / "baseline-s0"
    run_sweep([short], run.parent, progress=False)  # 21 steps, completed
    command = SMALL + ["--epochs", "0.006", "--evals-per-epoch", "20000", "--checkpoint-every", "0.001",
                       "--data-cache", str(tmp_path / "cache"), "--out", str(run.parent)]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process: the same sums in the same order
    proc = subprocess.Popen([sys.executable, "-m", "hlb_gpt", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=one_thread)
    past_21 = lambda: any(int(p.stem.rpartition("-")[2]) > 21 for p in list_checkpoints(run))  # noqa: E731
    wait_for(past_21, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = read_run(run)
    assert killed.summary is None and killed.config["epochs"] == 0.006
    assert 21 < killed.metrics[-1]["step"] < 61

    rerun = hlb(command, env=one_thread)  # the same command again
    assert rerun.returncode == 0, rerun.stderr
    assert "completed already" not in rerun.stderr and "resumed at step" in rerun.stderr
    assert read_run(run).status == "completed" and read_run(run).summary["steps"] == 61
    assert numbers(run) == numbers(tmp_path / "direct")
