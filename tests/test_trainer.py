"""The trainer, whatever the task: same seed, divergence, a crash, a full disk, resuming and checkpoint cadences hold
for every task, because one loop runs them all."""

import math

import pytest
import torch
from tqdm import tqdm

from hlb_gpt import checkpoint, data, flops
from hlb_gpt import train as train_module
from hlb_gpt.checkpoint import list_checkpoints, load_checkpoint
from hlb_gpt.config import Cadence, RunConfig
from hlb_gpt.flops import flops_per_token
from hlb_gpt.model import gpt_config
from hlb_gpt.records import read_run
from hlb_gpt.train import train

TASKS = ["lm", "modular"]
TIME_KEYS = {"time_s", "tokens_per_s"}
MINI_TOKENS = 1_290_590  # training tokens of mini with --tokenizer bytes


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokens")
    data.load_tokens("mini", data.get_tokenizer("bytes"), cache)
    return cache


def small(task, cache, **changes):
    """A run of the task in milliseconds a step. lm: 128 tokens a step and an evaluation at every step;
    modular: the benchmark's data and batches (an epoch of 10 steps, an evaluation after each) on a small model."""
    if task == "modular":
        values = dict(task="modular", depth=1, width=32, max_steps=20, device="cpu", checkpoint_every=0)
    else:
        values = dict(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                      eval_tokens=1024, evals_per_epoch=20_000, max_steps=20, checkpoint_every=0,
                      data_cache=str(cache))
    return RunConfig(**{**values, **changes})


def numbers(run_dir):
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in read_run(run_dir).metrics]


def ticking_clock(monkeypatch, seconds_per_step):
    """The checkpoint clock advances `seconds_per_step` with each optimizer step the trainer takes."""
    now = [0.0]
    step = train_module.optimizer_step

    def timed_step(*args, **kwargs):
        now[0] += seconds_per_step
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "checkpoint_clock", lambda: now[0])
    monkeypatch.setattr(train_module, "optimizer_step", timed_step)


def checkpoint_steps(run_dir):
    return [load_checkpoint(p)["loop"]["step"] for p in list_checkpoints(run_dir)]


# ----------------------------------------------------------------------------------------------- the runs


@pytest.mark.parametrize("task", TASKS)
def test_runs_with_the_same_seed_are_identical(tmp_path, token_cache, task):
    cfg = small(task, token_cache, grokfast=True, max_steps=20)
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    assert a["final_val_loss"] == b["final_val_loss"] and a.get("final_val_acc") == b.get("final_val_acc")


@pytest.mark.parametrize("task", TASKS)
def test_another_seed_gives_other_metrics(tmp_path, token_cache, task):
    train(small(task, token_cache), tmp_path / "a", progress=False)
    train(small(task, token_cache, seed=1), tmp_path / "b", progress=False)
    assert numbers(tmp_path / "a") != numbers(tmp_path / "b")


@pytest.mark.parametrize("task, changes, caught_at", [
    ("lm", dict(max_steps=None, epochs=0.01, evals_per_epoch=1, max_bad_steps=3), 20),  # the next sync point
    ("modular", dict(max_steps=40, max_bad_steps=5), 10),  # the first evaluation
])
def test_non_finite_gradients_for_too_many_steps_in_a_row_diverge_the_run(tmp_path, token_cache, monkeypatch, task,
                                                                          changes, caught_at):
    real_step = train_module.optimizer_step

    def poisoned(forward, micro, params, *args, **kwargs):
        nan_forward = lambda x, y: forward(x, y) * float("nan")  # noqa: E731
        return real_step(nan_forward, micro, params, *args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", poisoned)
    cfg = small(task, token_cache, **changes)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "diverged" == read_run(tmp_path / "run").status
    assert (f"more than {cfg.max_bad_steps} consecutive steps with non-finite gradients, from step 1"
            in summary["error"])
    assert summary["steps"] == caught_at  # noticed at the next check, not at the end of the run


@pytest.mark.parametrize("task", TASKS)
def test_a_run_that_diverges_before_its_first_trained_evaluation_has_no_best_or_final_value(tmp_path, token_cache,
                                                                                             monkeypatch, task):
    real_step = train_module.optimizer_step

    def poisoned(forward, micro, params, *args, **kwargs):
        return real_step(lambda x, y: forward(x, y) * float("nan"), micro, params, *args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", poisoned)
    changes = dict(max_steps=40, max_bad_steps=5) if task == "modular" else dict(max_bad_steps=3, evals_per_epoch=1)
    summary = train(small(task, token_cache, **changes), tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    assert summary["status"] == "diverged" and [row["step"] for row in run.metrics] == [0]  # only the untrained one
    for key in ("best_val_loss", "final_val_loss", "best_val_acc", "final_val_acc"):
        assert run.summary.get(key) is None, key  # not the untrained model's value


@pytest.mark.parametrize("task", TASKS)
def test_a_crash_leaves_a_failed_summary(tmp_path, token_cache, monkeypatch, task):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_module, "optimizer_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(small(task, token_cache), tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    assert run.status == "failed" and "boom" in run.summary["error"]


@pytest.mark.parametrize("task, changes, periodic", [
    ("lm", dict(max_steps=12, checkpoint_every=512 / MINI_TOKENS), [4, 8, 12]),  # 4 steps of 128 tokens
    ("modular", dict(max_steps=20, checkpoint_every=1), [10, 20]),
])
def test_a_checkpoint_that_cannot_be_written_is_reported_and_training_goes_on(tmp_path, token_cache, monkeypatch,
                                                                              caplog, task, changes, periodic):
    def full_disk(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with caplog.at_level("INFO", logger=train_module.__name__):
        summary = train(small(task, token_cache, **changes), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["steps"] == changes["max_steps"]
    failures = [r.message for r in caplog.records if "could not write" in r.message]
    # The final checkpoint is not tried again at the last step.
    assert [m.split(" (")[0] for m in failures] == [f"run: could not write the periodic checkpoint at step {step}"
                                                     for step in periodic]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("task, checkpoint_every, rows", [
    ("lm", 1.0, list(range(0, 36))),  # only the checkpoint at the end of the shorter run
    ("modular", 2, [0, 10, 20, 30, 35]),  # 0: the evaluation before training
])
def test_a_resumed_run_records_what_an_uninterrupted_run_does(tmp_path, token_cache, task, checkpoint_every, rows):
    cfg = small(task, token_cache, grokfast=True, max_steps=35, checkpoint_every=checkpoint_every)
    train(cfg, tmp_path / "straight", progress=False)
    # A run cut short at step 20 (checkpointed there), then resumed with the full budget.
    train(cfg.replace(max_steps=20), tmp_path / "resumed", progress=False)
    summary = train(cfg, tmp_path / "resumed", progress=False, resume=True)
    assert summary["steps"] == 35 and summary["status"] == "completed"
    assert numbers(tmp_path / "resumed") == numbers(tmp_path / "straight")
    assert [row["step"] for row in numbers(tmp_path / "resumed")] == rows


@pytest.mark.parametrize("task, tokens, rows", [
    ("lm", 25 * 128, list(range(0, 26))),  # one evaluation before training, none again when it continues
    ("modular", 25 * 512 - 2 * (512 - 48), [0, 10, 15, 20, 25]),  # two epochs' short last batches
])
def test_a_completed_run_given_more_steps_continues_from_its_end(tmp_path, token_cache, task, tokens, rows):
    cfg = small(task, token_cache, max_steps=15, checkpoint_every=1)
    train(cfg, tmp_path / "run", progress=False)
    summary = train(cfg.replace(max_steps=25), tmp_path / "run", progress=False, resume=True)
    assert summary["steps"] == 25 and summary["tokens"] == tokens
    assert [row["step"] for row in read_run(tmp_path / "run").metrics] == rows


# ----------------------------------------------------------------------------------------------- cadence in time


LM_CADENCE = dict(evals_per_epoch=1, eval_tokens=256, epochs=1.0, max_steps=60)


@pytest.mark.parametrize("task, changes, every, saved, more_steps, then_every, then_saved", [
    # Sync points at steps 1, 20, 40 and 60: 180 s have passed by step 40 (280 s), not again by 60 (140 s),
    # where the final checkpoint is written anyway; then 140 s between sync points > 1 minute.
    ("lm", LM_CADENCE, "3m", [40, 60], 100, "1m", [40, 60, 80, 100]),
    # Evaluations every 10 steps (70 s): the 2 minutes have passed at steps 20 and 40; then 70 s > 1 minute.
    ("modular", dict(max_steps=40), "2m", [20, 40], 60, "1m", [20, 40, 50, 60]),
])
def test_a_time_cadence_checkpoints_at_the_first_sync_point_after_the_interval_and_resumes_under_another(
        tmp_path, token_cache, monkeypatch, task, changes, every, saved, more_steps, then_every, then_saved):
    ticking_clock(monkeypatch, seconds_per_step=7.0)
    cfg = small(task, token_cache, **changes, checkpoint_every=every, keep_checkpoints=10)
    assert train(cfg, tmp_path / "run", progress=False)["status"] == "completed"
    assert checkpoint_steps(tmp_path / "run") == saved
    run = read_run(tmp_path / "run")
    assert run.config["checkpoint_every"] == every
    assert run.config["checkpoint_cadence"] == {"epochs": 0.0, "seconds": 60.0 * int(every[:-1])}

    summary = train(cfg.replace(checkpoint_every=then_every, max_steps=more_steps), tmp_path / "run",
                    progress=False, resume=True)
    assert summary["status"] == "completed" and summary["steps"] == more_steps
    assert checkpoint_steps(tmp_path / "run") == then_saved
    assert read_run(tmp_path / "run").config["checkpoint_every"] == then_every


@pytest.mark.parametrize("task, changes", [
    ("lm", dict(LM_CADENCE, max_steps=40, checkpoint_every=1.0)),  # an epoch is far more than 40 steps here
    ("modular", dict(max_steps=40, checkpoint_every=100)),
])
def test_an_epoch_cadence_ignores_the_clock(tmp_path, token_cache, monkeypatch, task, changes):
    ticking_clock(monkeypatch, seconds_per_step=3600.0)
    train(small(task, token_cache, **changes, keep_checkpoints=10), tmp_path / "run", progress=False)
    assert checkpoint_steps(tmp_path / "run") == [40]  # the final one


def test_without_checkpoint_every_a_tiny_corpus_checkpoints_at_most_every_ten_minutes_but_asked_every_epoch(
        tmp_path, monkeypatch):
    # The hlb preset on mini has 4.4 steps an epoch: a ~0.9 GB fsynced checkpoint at every epoch would be every
    # 4-5 steps. Here an epoch is 4 steps of 128 tokens and a step takes a minute.
    (tmp_path / "text").mkdir()
    for split in ("wiki.train.raw", "wiki.valid.raw"):
        (tmp_path / "text" / split).write_text("alpha beta gamma " * 30)  # 510 byte tokens
    ticking_clock(monkeypatch, seconds_per_step=60.0)
    cfg = RunConfig(data_dir=str(tmp_path / "text"), preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32,
                    batch_size=4, eval_tokens=64, epochs=100.0, max_steps=40, keep_checkpoints=100, device="cpu",
                    data_cache=str(tmp_path / "cache"))
    assert cfg.checkpoint_cadence == Cadence(epochs=1.0, min_seconds=600.0)
    train(cfg, tmp_path / "default", progress=False)
    saved = checkpoint_steps(tmp_path / "default")
    assert saved[-1] == 40 and len(saved) >= 3  # the epoch checkpoints, then the final one
    assert all(later - earlier >= 10 for earlier, later in zip([0] + saved[:-2], saved[:-1])), saved
    train(cfg.replace(checkpoint_every=1.0), tmp_path / "asked", progress=False)
    asked = checkpoint_steps(tmp_path / "asked")
    assert len(asked) >= 9 and min(b - a for a, b in zip(asked, asked[1:])) <= 5, asked


# ----------------------------------------------------------------------------------------------- throughput


def test_the_summary_records_tokens_and_flops_per_second_and_no_mfu_on_the_cpu(tmp_path, token_cache):
    cfg = small("lm", token_cache)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary == read_run(tmp_path / "run").summary
    tokens_per_step = cfg.batch_size * cfg.seq_len
    assert summary["tokens_per_s"] == pytest.approx(tokens_per_step / summary["step_time_s"])
    per_token = flops_per_token(gpt_config(cfg), cfg.seq_len)
    assert summary["flops_per_s"] == pytest.approx(summary["tokens_per_s"] * per_token)
    assert summary["mfu"] is None


def test_the_summary_records_mfu_over_the_peak_of_a_known_cuda_device(tmp_path, token_cache, monkeypatch):
    # The run trains on the CPU, with the peak its device would have if it were this GPU.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(train_module, "peak_flops", lambda device: flops.peak_flops(torch.device("cuda")))
    summary = train(small("lm", token_cache), tmp_path / "run", progress=False)
    assert summary["flops_per_s"] > 0
    assert summary["mfu"] == pytest.approx(summary["flops_per_s"] / 312e12)
    assert read_run(tmp_path / "run").summary["mfu"] == summary["mfu"]


def test_a_task_without_a_flops_count_records_tokens_per_second_but_no_flops(tmp_path, token_cache):
    summary = train(small("modular", token_cache), tmp_path / "run", progress=False)
    assert summary["tokens_per_s"] > 0 and summary["flops_per_s"] is None and summary["mfu"] is None


def test_the_progress_line_shows_tokens_per_second_and_mfu_when_the_device_has_a_peak():
    rate = {"tokens_per_s": 27647.2, "flops_per_s": 1.3e14, "mfu": 0.4123}
    assert train_module._postfix(0.2031, 2.4114, 2.3094, {}, rate) == (
        "epoch 0.203 | loss 2.411 | val 2.309 | 27,647 tokens/s | MFU 41.2%")
    on_cpu = {**rate, "mfu": None}
    assert train_module._postfix(0.2031, 2.4114, float("nan"), {"val_acc": 0.5}, on_cpu) == (
        "epoch 0.203 | loss 2.411 | val - | val acc 0.500 | 27,647 tokens/s")
    unknown = {"tokens_per_s": None, "flops_per_s": None, "mfu": None}
    assert train_module._postfix(0.0, 2.0, float("nan"), {}, unknown).endswith("| tokens/s -")


def test_the_progress_bar_shows_no_rate_of_its_own_in_steps():
    line = tqdm.format_meter(10, 64, 5.0, bar_format=train_module.BAR_FORMAT, unit="step",
                             postfix="epoch 0.031 | loss 2.411 | val - | 8,192 tokens/s")
    assert "step/s" not in line and "s/step" not in line and "it/s" not in line
    assert line.endswith("10/64 [00:05<00:27, epoch 0.031 | loss 2.411 | val - | 8,192 tokens/s]")


def test_a_checkpoint_from_before_flops_were_counted_resumes_with_them_unknown_not_undercounted():
    loop = train_module.LoopState(step=3, tokens=384, steady_time=1.5, steady_tokens=384)
    state = {k: v for k, v in loop.state_dict().items() if k not in ("flops", "steady_flops")}
    resumed = train_module.LoopState.from_state_dict(state)
    assert resumed.step == 3 and math.isnan(resumed.flops) and math.isnan(resumed.steady_flops)
    assert train_module.run_summary("completed", None, resumed, 1000, 2.0, {}, {}, 1e12)["flops_per_s"] is None
