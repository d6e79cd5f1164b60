"""torch.compile in sweeps of many runs in one process: one filter graph for every setting, a clean compile
state per run, an eager fallback on compile errors, and compile time kept out of the step time."""

import json
import logging
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hlb_gpt import compiling
from hlb_gpt.compiling import graphs_compiled
from hlb_gpt.config import RunConfig
from hlb_gpt.grokfast import EMAFilter, MAFilter
from hlb_gpt.records import read_run
from hlb_gpt.train import train

# Cheap runs: one block of width 16, 32-token windows, 2 sequences a step, 4 validation windows (2 full batches).
SMALL = dict(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=16, seq_len=32, batch_size=2,
             eval_tokens=4 * 32 + 1, checkpoint_every=0, device="cpu")
SMALL_FLAGS = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--depth", "1", "--seq-len", "32",
               "--batch-size", "2", "--eval-tokens", str(4 * 32 + 1), "--checkpoint-every", "0", "--device", "cpu"]


def small(tmp_path, **changes):
    return RunConfig(**{**SMALL, "data_cache": str(tmp_path / "cache"), **changes})


def failing_backend(gm, example_inputs):
    raise RuntimeError("forced compile failure")


def feed(filt, params, steps=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        filt.step()


def sweep(tmp_path, *flags):
    """Run the CLI in its own process (its own dynamo state); return its stderr and the runs' summaries."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "hlb_gpt", *SMALL_FLAGS, "--data-cache", str(tmp_path / "cache"), "--compile",
           "--out", str(out), *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(out.iterdir()) if d.is_dir()}
    return res, summaries


# -- the filter: hyperparameters are graph inputs ------------------------------------------------------------
def test_one_compiled_filter_graph_serves_every_alpha_gain_and_window_in_one_process(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # the guards are dynamo's, whatever the backend
    torch._dynamo.reset()
    before = graphs_compiled()
    for i in range(10):  # more distinct settings than dynamo's recompile limit (8), no reset between them
        params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
        filt = EMAFilter(params, alpha=0.05 + 0.09 * i, gain=0.5 + i, compile=True)
        feed(filt, params)
        assert filt.compile_error is None
    assert graphs_compiled() - before == 1
    before = graphs_compiled()
    for window in (5, 10):  # the ring's shape depends on the window: one graph per window
        for gain in range(10):
            params = [torch.nn.Parameter(torch.zeros(3, 4))]
            filt = MAFilter(params, window=window, gain=gain + 1.0, compile=True)
            feed(filt, params)
            assert filt.compile_error is None
    assert graphs_compiled() - before == 2


def test_a_filter_whose_compile_fails_runs_eagerly_with_one_warning_and_the_same_result(monkeypatch, caplog):
    monkeypatch.setattr(compiling, "BACKEND", failing_backend)
    params = [torch.nn.Parameter(torch.zeros(3, 4))]
    reference = [torch.nn.Parameter(torch.zeros(3, 4))]
    filt, eager = EMAFilter(params, alpha=0.9, gain=2.0, compile=True), EMAFilter(reference, alpha=0.9, gain=2.0)
    with caplog.at_level(logging.WARNING, logger="hlb_gpt.compiling"):
        feed(filt, params, steps=4)
    feed(eager, reference, steps=4)
    assert "forced compile failure" in filt.compile_error
    assert len([r for r in caplog.records if "torch.compile failed" in r.message]) == 1
    torch.testing.assert_close(params[0].grad, reference[0].grad)
    torch.testing.assert_close(filt.state[params[0]]["mu"], eager.state[reference[0]]["mu"])


def recompile_limit(n: int):
    """dynamo's recompile limit for one block. Not pytest's monkeypatch: since pytest 9.2 its undo deletes the
    attribute from torch's config module, which hides the setting from dynamo for the rest of the session."""
    return torch._dynamo.config.patch(recompile_limit=n)


def test_reaching_the_recompile_limit_falls_back_to_eager_with_one_warning_instead_of_silently(
        monkeypatch, caplog):
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    torch._dynamo.reset()
    double = compiling.FallbackCompiled(lambda x: 2 * x, "doubling", dynamic=False)
    with caplog.at_level(logging.WARNING, logger="hlb_gpt.compiling"), recompile_limit(2):
        results = [double(torch.ones(n)) for n in (1, 2, 3, 4, 5)]  # a new static shape each call
    assert all(torch.equal(r, torch.full((n,), 2.0)) for r, n in zip(results, (1, 2, 3, 4, 5)))
    assert "FailOnRecompileLimitHit" in double.error
    assert len([r for r in caplog.records if "torch.compile failed" in r.message]) == 1


# -- a run: fallback and summary fields ------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["lm", "modular"])
def test_a_run_whose_compile_fails_completes_eagerly_says_so_once_and_matches_an_eager_run(
        tmp_path, monkeypatch, caplog, task):
    changes = dict(grokfast=True, filter="ema", alpha=0.9, gain=1.0, max_steps=3)
    if task == "modular":
        cfg = RunConfig(task="modular", depth=1, width=32, checkpoint_every=0, device="cpu", compile=True, **changes)
        trainer = train
    else:
        cfg, trainer = small(tmp_path, compile=True, **changes), train
    eager = trainer(cfg.replace(compile=False), tmp_path / "eager", progress=False)
    monkeypatch.setattr(compiling, "BACKEND", failing_backend)
    with caplog.at_level(logging.WARNING, logger="hlb_gpt.compiling"):
        summary = trainer(cfg, tmp_path / "compiled", progress=False)
    assert summary["status"] == "completed"
    assert summary["compiled"] is False and "forced compile failure" in summary["compile_error"]
    assert read_run(tmp_path / "compiled").summary["compiled"] is False
    warnings = [r.message for r in caplog.records if "torch.compile failed" in r.message]
    # One line for each part that fell back (the model, the filter), not one per step or evaluation.
    assert sorted(w.split(":")[0] for w in warnings) == ["the EMA filter", "the model"]
    assert summary["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-5)
    assert eager["compiled"] is False and eager["compile_error"] is None and eager["compile_count"] == 0


def test_compile_time_is_kept_out_of_the_steady_step_time(tmp_path, monkeypatch):
    # dynamo's tracing-only backend: graphs are compiled (and counted) as with inductor, in a fraction of the time.
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    summary = train(small(tmp_path, compile=True, max_steps=41, evals_per_epoch=1), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["compiled"] is True and summary["compile_error"] is None
    # The training graph (one for every batch and length) and the evaluation's (no grad) graph.
    assert summary["compile_count"] == 2
    # Host syncs at steps 1, 20, 40, 41: the first interval compiled, the other 40 steps are steady.
    assert summary["steady_steps"] == 40 and summary["compile_time_s"] > 0
    assert summary["step_time_s"] * summary["steady_steps"] + summary["compile_time_s"] == pytest.approx(
        summary["train_time_s"], rel=1e-9)
    rows = read_run(tmp_path / "run").metrics
    assert rows[-1]["tokens_per_s"] == pytest.approx(40 * 2 * 32 / (summary["step_time_s"] * 40), rel=1e-6)


def test_an_eager_run_has_no_compile_time_and_every_step_is_steady(tmp_path):
    summary = train(small(tmp_path, compile=False, max_steps=21), tmp_path / "run", progress=False)
    assert summary["compiled"] is False and summary["compile_count"] == 0 and summary["compile_time_s"] == 0
    assert summary["steady_steps"] == 21
    assert summary["step_time_s"] * 21 == pytest.approx(summary["train_time_s"], rel=1e-9)


@pytest.mark.slow
def test_each_run_starts_from_a_clean_compile_state_so_a_model_grid_never_reaches_the_recompile_limit(
        tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    # A run compiles the model's forward twice (training; evaluation, without grad). Carried over between
    # runs, three architectures would make six variants of that one function, past a limit of three.
    with recompile_limit(3):
        summaries = [train(small(tmp_path, compile=True, max_steps=1, width=w), tmp_path / f"w{w}", progress=False)
                     for w in (8, 16, 24)]
    assert [(s["compiled"], s["compile_count"]) for s in summaries] == [(True, 2)] * 3


# -- sweeps through the CLI, compiled with inductor ----------------------------------------------------------
@pytest.mark.slow
def test_a_compiled_sweep_of_ten_alphas_completes_every_run_without_hitting_the_recompile_limit(tmp_path):
    alphas = ",".join(f"{0.05 + 0.09 * i:g}" for i in range(10))
    res, summaries = sweep(tmp_path, "--grokfast", "--alpha", alphas, "--gain", "1", "--max-steps", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(summaries) == 10
    assert all(s["status"] == "completed" and s["compiled"] for s in summaries.values()), summaries
    assert "recompile_limit" not in res.stderr and "recompile limit" not in res.stderr
    assert "torch.compile failed" not in res.stderr


@pytest.mark.slow
def test_a_compiled_sweep_of_five_gains_and_two_ma_windows_completes_every_run_without_hitting_the_limit(tmp_path):
    # 10 runs in one process: past dynamo's recompile limit of 8, were a run's graphs carried over to the next.
    gains = ",".join(str(g) for g in range(1, 6))
    res, summaries = sweep(tmp_path, "--grokfast", "--filter", "ma", "--window", "5,10", "--gain", gains,
                           "--max-steps", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(summaries) == 10
    assert all(s["status"] == "completed" and s["compiled"] for s in summaries.values()), summaries
    assert "recompile_limit" not in res.stderr and "recompile limit" not in res.stderr
    assert "torch.compile failed" not in res.stderr


@pytest.mark.slow
def test_a_compiled_sweep_using_every_end_of_run_and_bookkeeping_flag_completes_each_run_with_its_own_records(
        tmp_path, monkeypatch):
    # The workload: many compiled runs in one process, each with a training-text cut, a target, a profiled window,
    # the test split at its end and its own offline wandb run.
    from hlb_gpt.data import load_split_texts

    texts = load_split_texts("mini")
    data = tmp_path / "data"
    data.mkdir()
    for name, text in (("train", texts["train"]), ("valid", texts["valid"][:20_000]),
                       ("test", texts["valid"][20_000:30_000])):
        (data / f"wiki.{name}.raw").write_text(text, encoding="utf-8", newline="")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    res, summaries = sweep(tmp_path, "--data-dir", str(data), "--train-tokens", "512,1024", "--grokfast", "--baseline",
                           "--alpha", "0.9", "--gain", "0.1", "--target-loss", "0.01", "--profile", "2",
                           "--eval-test", "--wandb", "--wandb-project", "compiled-sweep", "--max-steps", "5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(summaries) == ["baseline-train1024-s0", "baseline-train512-s0", "ema-a0.9-g0.1-train1024-s0",
                                 "ema-a0.9-g0.1-train512-s0"]
    for name, s in summaries.items():
        assert s["status"] == "completed" and s["compiled"] and s["steps"] == 5, (name, s)
        assert s["steps_to_target"] is None and math.isfinite(s["test_loss"]), (name, s)
        json.loads((tmp_path / "runs" / name / "profile.json").read_text())
    ids = {(tmp_path / "runs" / name / "wandb-run-id").read_text().strip() for name in summaries}
    assert len(ids) == 4
    assert "recompile_limit" not in res.stderr and "recompile limit" not in res.stderr
    assert "torch.compile failed" not in res.stderr


@pytest.mark.slow
def test_a_compiled_width_sweep_compiles_every_run_a_few_times_over_the_sequence_warmup(tmp_path):
    # --seq-len 64: the warm-up goes 32 then 64 tokens (from step 80) at 128 tokens a step; 90 steps cover both.
    res, summaries = sweep(tmp_path, "--width", "16,24,32,40", "--seq-len", "64", "--eval-tokens", str(2 * 64 + 1),
                           "--max-steps", "90")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(summaries) == 4
    for name, s in summaries.items():
        assert s["status"] == "completed" and s["compiled"] is True, (name, s)
        assert 1 <= s["compile_count"] <= 4, (name, s["compile_count"])
        assert s["steady_steps"] > 0 and math.isfinite(s["step_time_s"])
    assert "recompile_limit" not in res.stderr


# -- what this torch supports ----------------------------------------------------------------------------------
def test_a_compile_setting_this_torch_lacks_is_left_out_of_the_patch_instead_of_failing_the_run(monkeypatch):
    # An older torch without one of the keys raised AttributeError outside the compile-error handling.
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    monkeypatch.setattr(compiling, "PATCHES", {**compiling.PATCHES,
                                               "torch._dynamo.config": {"a_setting_no_torch_has": True,
                                                                        "fail_on_recompile_limit_hit": True}})
    torch._dynamo.reset()
    double = compiling.FallbackCompiled(lambda x: 2 * x, "doubling")
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0)) and double.error is None


def test_compiling_on_a_torch_without_a_setting_the_fallback_needs_is_refused_in_one_line(tmp_path, monkeypatch):
    from hlb_gpt.config import ConfigError
    from hlb_gpt.train import check_attention, compiles

    monkeypatch.setattr(compiling, "PATCHES", {**compiling.PATCHES,
                                               "torch._functorch.config": {"a_setting_no_torch_has": True}})
    monkeypatch.setattr(compiling, "REQUIRED", ("a_setting_no_torch_has",))
    with pytest.raises(ConfigError) as exc:
        check_attention(small(tmp_path, compile=True))
    assert str(exc.value) == (f"--compile needs torch._functorch.config.a_setting_no_torch_has, which torch "
                              f"{torch.__version__} lacks: upgrade torch or use --no-compile")
    assert compiles(small(tmp_path, compile=False), torch.device("cpu")) is False  # an eager run is not refused
    with pytest.raises(ConfigError, match="--no-compile"):
        train(small(tmp_path, compile=True, max_steps=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_declared_torch_floor_has_everything_the_code_uses_and_no_cap():
    # torch.optim.Muon (--optimizer muon) arrived in torch 2.9, FlexAttention in 2.5.
    import re
    from pathlib import Path

    metadata = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (requirement,) = re.findall(r'"(torch[^"]*)"', metadata)
    assert requirement == "torch>=2.9"


def test_the_compile_time_of_the_evaluation_before_training_counts_in_compile_time(tmp_path, monkeypatch):
    # The loop's laps read a clock that only compiling moves: 100 s a graph, whatever this machine's speed.
    now = [0.0]

    def slow_backend(gm, example_inputs):  # dynamo's tracing-only backend, taking 100 s to compile
        now[0] += 100.0
        return gm.forward

    monkeypatch.setattr(compiling, "BACKEND", slow_backend)
    monkeypatch.setattr(compiling, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    summary = train(small(tmp_path, compile=True, max_steps=1), tmp_path / "run", progress=False)
    # The evaluation graph (compiled by the evaluation at step 0) and the training graph (step 1).
    assert summary["compile_count"] == 2 and summary["compile_time_s"] == 200.0
    assert summary["step_time_s"] is None and summary["train_time_s"] == 200.0


@pytest.mark.slow
def test_after_the_sequence_warm_up_the_full_length_is_compiled_static_and_nothing_recompiles(tmp_path, monkeypatch):
    # --seq-len 64: 80 steps of 32 tokens, then 64 for good. The full length gets one specialised graph (no bounds
    # checks); evaluation always has it.
    from hlb_gpt import train as train_module

    steps, graphs = [0], []
    step = train_module.optimizer_step

    def counted_step(*args, **kwargs):
        steps[0] += 1
        return step(*args, **kwargs)

    def recording_backend(gm, example_inputs):  # dynamo's tracing-only backend, noting the token input's shape
        tokens = [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")
                  if isinstance(node.meta.get("example_value"), torch.Tensor)
                  and node.meta["example_value"].dtype == torch.long]
        graphs.append((steps[0], torch.is_grad_enabled(), str(tokens[0].shape[1])))
        return gm.forward

    monkeypatch.setattr(train_module, "optimizer_step", counted_step)
    monkeypatch.setattr(compiling, "BACKEND", recording_backend)
    summary = train(small(tmp_path, compile=True, seq_len=64, batch_size=4, eval_tokens=2 * 64 + 1, max_steps=100,
                          evals_per_epoch=1), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["compiled"] is True
    # (steps taken, training?, length as the graph sees it): the evaluation before training, the warm-up's
    # dynamic graph, then the full length's, and nothing after it (steps 82-100, the final evaluation).
    assert graphs[0] == (0, False, "64") and graphs[1][:2] == (1, True) and not graphs[1][2].isdigit()
    assert graphs[2:] == [(81, True, "64")]
    assert summary["compile_count"] == 3


def test_a_dynamic_dimension_at_its_static_size_gets_one_specialised_graph_of_its_own(monkeypatch):
    # The full sequence length, which a run keeps after its warm-up: no bounds checks, kernels for that size.
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    torch._dynamo.reset()
    before = graphs_compiled()
    total = compiling.FallbackCompiled(lambda x: x.sum(1), "summing", dynamic_dims=(0, 1), static_sizes={1: 16})
    for batch, length in [(4, 4), (2, 8), (4, 16), (2, 16), (3, 16), (4, 8)]:
        torch.testing.assert_close(total(torch.ones(batch, length)), torch.full((batch,), float(length)))
    assert total.error is None
    assert graphs_compiled() - before == 2  # lengths 4 and 8 share one graph; 16 has its own, for every batch
