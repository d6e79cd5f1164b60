"""--profile N: a torch.profiler Chrome trace of a few training steps in the run folder, and nothing else changed."""

import json

import pytest

from hlb_gpt import data
from hlb_gpt import train as train_module
from hlb_gpt.config import BOOKKEEPING, ConfigError, RunConfig
from hlb_gpt.profiling import PROFILE, PROFILE_STEPS, profile_window
from hlb_gpt.records import read_run
from hlb_gpt.train import train

from tiny_runs import TINY, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

TIME_KEYS = {"time_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokens")
    data.load_tokens("mini", data.get_tokenizer("bytes"), cache)
    return cache


def small(cache, **changes):
    """128 tokens a step and an evaluation at every step, so every step ends at a sync point."""
    return RunConfig(**{**dict(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32,
                               batch_size=4, eval_tokens=1024, evals_per_epoch=20_000, max_steps=6,
                               checkpoint_every=0, data_cache=str(cache)), **changes})


def numbers(run_dir):
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in read_run(run_dir).metrics]


@pytest.mark.slow
def test_a_profiled_run_writes_a_chrome_trace_of_its_steps_and_records_what_an_unprofiled_one_does(
        tmp_path, token_cache):
    plain = train(small(token_cache), tmp_path / "plain", progress=False)
    profiled = train(small(token_cache, profile=2), tmp_path / "profiled", progress=False)
    trace = json.loads((tmp_path / "profiled" / PROFILE).read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("step ")}
    assert steps == {"step 2", "step 3", "step 4"}
    assert numbers(tmp_path / "profiled") == numbers(tmp_path / "plain")
    assert not (tmp_path / "plain" / PROFILE).exists()
    # The profiled steps (2, 3, 4) are training time but not steady time: the profiler's overhead is not the run's.
    assert plain["steady_steps"] == 6 and profiled["steady_steps"] == 6 - PROFILE_STEPS
    assert profiled["steps"] == plain["steps"] and profiled["best_val_loss"] == plain["best_val_loss"]


def test_profile_window_is_the_steps_from_n_cut_at_the_run_s_end_or_none_with_the_reason():
    assert profile_window(5, start_step=0, total_steps=100) == ((5, 4 + PROFILE_STEPS), None)
    assert profile_window(1, start_step=0, total_steps=100) == ((1, PROFILE_STEPS), None)
    assert profile_window(99, start_step=0, total_steps=100) == ((99, 100), None)
    assert profile_window(5, start_step=4, total_steps=100) == ((5, 4 + PROFILE_STEPS), None)  # resumed just before
    window, why = profile_window(101, start_step=0, total_steps=100)
    assert window is None and why == "--profile 101 is past the run's last step (100): no profile.json"
    window, why = profile_window(5, start_step=10, total_steps=100)
    assert window is None and why == "--profile 5: the run continues from step 10, after it: no profile.json"
    assert profile_window(None, start_step=0, total_steps=100) == (None, None)


def test_a_profile_step_past_the_run_s_end_is_said_and_the_run_goes_on_without_a_trace(tmp_path, token_cache,
                                                                                       caplog):
    with caplog.at_level("INFO", logger=train_module.__name__):
        summary = train(small(token_cache, max_steps=2, profile=3), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and not (tmp_path / "run" / PROFILE).exists()
    assert any("--profile 3 is past the run's last step (2)" in r.message for r in caplog.records)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_profile_step_below_one_is_refused_in_one_line(capsys, tmp_path, value):
    code, _, err = run_main(TINY + ["--profile", value, "--out", str(tmp_path)], capsys)
    assert code == 2 and f"--profile must be a step >= 1 (got {value})" in err
    assert len(err.strip().splitlines()) <= 2  # click's "Error: " line, maybe after a usage line


def test_profile_is_bookkeeping_a_resumed_run_may_change():
    with pytest.raises(ConfigError):
        RunConfig(profile=0)
    assert "profile" in BOOKKEEPING  # compare never separates runs by it, and a resumed run may change it
    assert RunConfig(profile=3).differences(RunConfig(), ignore=BOOKKEEPING) == []


def test_a_run_that_fails_among_the_traced_steps_writes_the_trace_of_those_it_took_and_its_summary(
        tmp_path, token_cache, monkeypatch):
    step = train_module.optimizer_step
    calls = []

    def failing_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", failing_at_step_3)
    with pytest.raises(RuntimeError, match="boom"):
        train(small(token_cache, profile=2), tmp_path / "run", progress=False)
    assert read_run(tmp_path / "run").summary["status"] == "failed"
    trace = json.loads((tmp_path / "run" / PROFILE).read_text())
    assert {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("step ")} == {"step 2", "step 3"}
