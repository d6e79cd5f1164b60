import contextlib
import math

import pytest
import torch

from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.grokfast import EMAFilter
from hlb_gpt.model import GPT, GPTConfig
from hlb_gpt.optim import make_optimizer, make_scheduler, param_groups
from hlb_gpt.records import METRIC_KEYS, read_run
from hlb_gpt.tasks import lm
from hlb_gpt.tasks.lm import BatchSchedule, evaluate
from hlb_gpt.train import Diverged, Interrupted, RunStatus, eval_due, optimizer_step, train

TIME_KEYS = {"time_s", "tokens_per_s"}


def tiny(tmp_path, **changes):
    values = dict(dataset="mini", preset="tiny", tokenizer="bytes", data_cache=str(tmp_path / "cache"),
                  depth=2, width=64, epochs=0.006, evals_per_epoch=500, eval_tokens=4096, seq_len=64, batch_size=8)
    values.update(changes)
    return RunConfig(**values)


def numbers(run_dir):
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in read_run(run_dir).metrics]


def test_sequence_warmup_doubles_every_80_steps_at_constant_tokens_per_step():
    s = BatchSchedule(seq_len=256, batch_size=16, seq_warmup=True)
    assert [s.length_at(k) for k in (0, 79, 80, 160, 240, 10_000)] == [32, 32, 64, 128, 256, 256]
    assert {s.batch_at(k) * s.length_at(k) for k in (0, 80, 160, 240)} == {16 * 256}


def test_without_sequence_warmup_every_step_is_full_length():
    s = BatchSchedule(seq_len=256, batch_size=16, seq_warmup=False)
    assert s.length_at(0) == 256 and s.batch_at(0) == 16


def test_steps_for_covers_the_requested_tokens():
    s = BatchSchedule(seq_len=100, batch_size=3, seq_warmup=True)
    steps = s.steps_for(10_000)
    seen = sum(s.batch_at(k) * s.length_at(k) for k in range(steps))
    assert seen >= 10_000 > seen - s.batch_at(steps - 1) * s.length_at(steps - 1)


def walked_steps_for(s: BatchSchedule, tokens: float) -> int:
    """The reference: step by step until the tokens are covered."""
    step, seen = 0, 0
    while seen < tokens:
        seen += s.batch_at(step) * s.length_at(step)
        step += 1
    return step


SCHEDULES = [BatchSchedule(seq_len, batch, warmup)
             for seq_len in (1, 4, 31, 32, 33, 48, 64, 100, 256, 1000, 1024, 4096)
             for batch in (1, 3, 16) for warmup in (True, False)]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"T{s.seq_len}-B{s.batch_size}-{'warm' if s.seq_warmup else 'flat'}")
def test_steps_for_in_closed_form_equals_the_step_by_step_walk(s):
    per_phase = [80 * s.batch_at(80 * k) * s.length_at(80 * k) for k in range(9)]
    edges = [sum(per_phase[:k]) for k in range(1, 10)]  # tokens at each warm-up phase's end
    amounts = [0, -5, 1, 0.5, 31.9, 32, 33, 2_500, 10_000.25, 123_457, 1e6, 3_333_333.3]
    amounts += [e + d for e in edges for d in (-1, 0, 1, 0.5)]
    for tokens in amounts:
        assert s.steps_for(tokens) == walked_steps_for(s, tokens), tokens


def test_steps_for_a_billion_epochs_is_exact_without_walking():
    s = BatchSchedule(seq_len=256, batch_size=16, seq_warmup=True)
    tokens = 1e9 * 1_290_590  # --epochs 1e9 of mini with --tokenizer bytes
    steps = s.steps_for(tokens)
    warmup_tokens = 3 * 80 * 4096  # three warm-up phases (32, 64, 128), then full 256-token sequences
    assert steps == 240 + math.ceil((tokens - warmup_tokens) / 4096)
    assert s.steps_for(1e300) > 10 ** 295  # exact arithmetic: no overflow, no endless correction


def test_eval_is_due_when_a_token_threshold_is_crossed():
    assert eval_due(90, 110, 100) and not eval_due(110, 190, 100) and eval_due(190, 200, 100)


def test_a_short_run_writes_config_metrics_and_summary(tmp_path):
    cfg = tiny(tmp_path)
    summary = train(cfg, tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    assert summary["status"] == "completed" == run.status
    assert run.config["seed"] == 0 and run.config["versions"]["torch"] == torch.__version__
    assert run.config["resolved_device"] == "cpu"
    assert len(run.metrics) >= 2
    assert run.metrics[0]["step"] == 0 and run.metrics[0]["train_loss"] is None  # evaluated before training
    for row in run.metrics:
        assert set(METRIC_KEYS) <= set(row)
        assert math.isfinite(row["val_loss"]) and (row["step"] == 0 or math.isfinite(row["train_loss"]))
        assert row["ema_ratio"] is None  # no filter
    assert [r["step"] for r in run.metrics] == sorted(r["step"] for r in run.metrics)
    assert run.metrics[-1]["step"] == summary["steps"]
    assert summary["final_val_loss"] == run.metrics[-1]["val_loss"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in run.metrics[1:])  # after training began
    assert abs(run.metrics[-1]["epoch"] - summary["tokens"] / run.config["train_tokens"]) < 1e-12


def test_summary_reports_exact_memory_of_params_grads_and_optimizer_state(tmp_path):
    cfg = tiny(tmp_path)
    summary = train(cfg, tmp_path / "run", progress=False)
    n = read_run(tmp_path / "run").config["n_params"]
    mem = summary["memory"]
    assert mem["params_bytes"] == 4 * n and mem["grads_bytes"] == 4 * n
    # AdamW keeps two float32 moments per parameter, plus one step counter per tensor.
    assert 8 * n <= mem["optimizer_bytes"] <= 8 * n + 8 * 64
    assert mem["filter_bytes"] == 0 and mem["peak_bytes"] > mem["params_bytes"]


def test_the_gpt2_tokenizer_trains_offline_on_mini(tmp_path):
    cfg = tiny(tmp_path, tokenizer="gpt2", depth=1, width=32, epochs=0.03, evals_per_epoch=80)
    summary = train(cfg, tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    assert summary["status"] == "completed" and run.config["train_tokens"] == 286_221
    assert len(run.metrics) >= 2 and all(math.isfinite(r["val_loss"]) for r in run.metrics)


@pytest.mark.parametrize("gate", ["relu", "sigmoid"])
def test_gated_blocks_train(tmp_path, gate):
    summary = train(tiny(tmp_path, gate=gate), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])


def test_bf16_autocast_runs_on_cpu(tmp_path):
    summary = train(tiny(tmp_path, precision="bf16"), tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    train(tiny(tmp_path), tmp_path / "a", progress=False)
    train(tiny(tmp_path, grad_accum=4), tmp_path / "b", progress=False)
    a, b = numbers(tmp_path / "a"), numbers(tmp_path / "b")
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_compiled_model_trains_on_cpu_and_matches_eager(tmp_path):
    train(tiny(tmp_path), tmp_path / "eager", progress=False)
    summary = train(tiny(tmp_path, compile=True), tmp_path / "compiled", progress=False)
    assert summary["status"] == "completed"
    eager, compiled = numbers(tmp_path / "eager"), numbers(tmp_path / "compiled")
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)


@pytest.mark.slow
def test_the_issue_check_command_learns_and_repeats_exactly(tmp_path):
    """`hlb-gpt --dataset mini --preset tiny --tokenizer bytes --epochs 0.2 --evals-per-epoch 10`."""
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", epochs=0.2, evals_per_epoch=10,
                    data_cache=str(tmp_path / "cache"))
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    rows = numbers(tmp_path / "a")
    assert len(rows) >= 2
    vals = [r["val_loss"] for r in rows]
    assert all(math.isfinite(v) for v in vals)
    assert all(later < earlier for earlier, later in zip(vals, vals[1:])), vals
    assert rows == numbers(tmp_path / "b")


@pytest.mark.parametrize("changes, bytes_per_param", [
    (dict(filter="ema"), 4),
    (dict(filter="ema", filter_dtype="bfloat16"), 2),
    (dict(filter="ma", window=3), (3 + 1) * 4),
])
def test_summary_reports_the_exact_filter_state_size(tmp_path, changes, bytes_per_param):
    summary = train(tiny(tmp_path, grokfast=True, **changes), tmp_path / "run", progress=False)
    n = read_run(tmp_path / "run").config["n_params"]
    mem = summary["memory"]
    assert mem["filter_bytes"] == bytes_per_param * n
    total = mem["params_bytes"] + mem["grads_bytes"] + mem["optimizer_bytes"] + mem["filter_bytes"]
    assert mem["training_state_bytes"] == total
    assert mem["filter_share"] == pytest.approx(mem["filter_bytes"] / total)


def test_filtered_runs_log_the_filter_strength_at_every_evaluation(tmp_path):
    train(tiny(tmp_path, grokfast=True, alpha=0.9, gain=0.5), tmp_path / "run", progress=False)
    ratios = [row["ema_ratio"] for row in read_run(tmp_path / "run").metrics if row["step"] > 0]
    assert ratios and all(r is not None and 0 < r < 10 for r in ratios)


def test_the_filter_changes_training_and_a_zero_gain_filter_does_not(tmp_path):
    train(tiny(tmp_path), tmp_path / "base", progress=False)
    train(tiny(tmp_path, grokfast=True, gain=0.0), tmp_path / "g0", progress=False)
    train(tiny(tmp_path, grokfast=True, gain=2.0), tmp_path / "g2", progress=False)
    vals = {name: [r["val_loss"] for r in read_run(tmp_path / name).metrics] for name in ("base", "g0", "g2")}
    assert vals["g0"] == vals["base"]
    assert vals["g2"] != vals["base"]


def test_grokadamw_trains_on_mini(tmp_path):
    summary = train(tiny(tmp_path, optimizer="grokadamw", alpha=0.9, gain=0.5, epochs=0.02, evals_per_epoch=100),
                    tmp_path / "run", progress=False)
    vals = [r["val_loss"] for r in read_run(tmp_path / "run").metrics]
    assert summary["status"] == "completed" and all(math.isfinite(v) for v in vals)
    assert vals[-1] < vals[0]


def _step_parts(named, lr=1e-3):
    opt = make_optimizer(param_groups(named, lr=lr, weight_decay=0.0))
    return opt, make_scheduler(opt), EMAFilter(named, alpha=0.9, gain=1.0)


def test_filter_state_advances_once_per_optimizer_step_with_gradient_accumulation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, depth=1, width=16, max_seq_len=8))
    named = list(model.named_parameters())
    opt, sched, ema = _step_parts(named)
    x = torch.randint(0, 64, (8, 8))
    micro = list(zip(x.chunk(4), x.roll(1, 1).chunk(4)))
    for expected in (1, 2):
        optimizer_step(model, micro, [p for _, p in named], opt, sched, ema, None, contextlib.nullcontext)
        assert {int(st["step"]) for st in ema.state_dict()["state"].values()} == {expected}


def test_a_step_with_non_finite_gradients_is_skipped_without_touching_filter_or_weights():
    w = torch.nn.Parameter(torch.ones(3, 3))
    opt, sched, ema = _step_parts([("blocks.0.expand", w)], lr=1e-2)
    loss = lambda x, _: (w * x).sum()  # noqa: E731
    optimizer_step(loss, [(torch.ones(3, 3), None)], [w], opt, sched, ema, None, contextlib.nullcontext)
    w_before = w.detach().clone()
    mu_before = ema.state_dict()["state"]["blocks.0.expand"]["mu"].clone()
    adam_before = {k: v.clone() for k, v in opt.state[w].items()}
    result = optimizer_step(loss, [(torch.full((3, 3), float("nan")), None)], [w], opt, sched, ema, None,
                            contextlib.nullcontext)
    assert result.found_inf.item() == 1.0
    assert torch.equal(w.detach(), w_before)
    assert torch.equal(ema.state_dict()["state"]["blocks.0.expand"]["mu"], mu_before)
    assert all(torch.equal(opt.state[w][k], v) for k, v in adam_before.items())


def test_run_status_records_how_a_run_ended_and_swallows_only_divergence():
    said = []
    with RunStatus("r", said.append) as done:
        pass
    assert (done.status, done.error) == ("completed", None)
    with RunStatus("r", said.append) as diverged:
        raise Diverged("validation loss is not finite at step 6")
    assert (diverged.status, diverged.error) == ("diverged", "validation loss is not finite at step 6")
    assert said == ["r: diverged: validation loss is not finite at step 6"]
    for exc, status, error in [
        (Interrupted("stopped by SIGINT at step 3"), "interrupted", "stopped by SIGINT at step 3"),
        (KeyboardInterrupt(), "interrupted", "KeyboardInterrupt"),
        (OSError("disk full"), "failed", "OSError: disk full"),
        (SystemExit(3), "interrupted", "3"),  # never "completed"
    ]:
        outcome = RunStatus("r", said.append)
        with pytest.raises(type(exc)), outcome:
            raise exc
        assert (outcome.status, outcome.error) == (status, error)


def test_config_records_the_sha256_of_the_text_it_trained_on_and_the_precision_it_used(tmp_path):
    import hashlib

    from hlb_gpt.data import load_split_texts

    train(tiny(tmp_path), tmp_path / "run", progress=False)
    config = read_run(tmp_path / "run").config
    texts = load_split_texts("mini")
    assert config["text_sha256"] == {split: hashlib.sha256(texts[split].encode("utf-8")).hexdigest()
                                     for split in ("train", "valid")}
    assert config["resolved_precision"] == "fp32"  # --precision auto on the CPU


def test_a_run_is_not_resumed_on_other_text_from_a_moved_data_dir(tmp_path):
    from hlb_gpt.config import ConfigError

    for name, word in (("here", "alpha beta gamma "), ("there", "delta epsilon zeta ")):
        (tmp_path / name).mkdir()
        for split in ("wiki.train.raw", "wiki.valid.raw"):
            (tmp_path / name / split).write_text(word * 400)
    cfg = tiny(tmp_path, data_dir=str(tmp_path / "here"), eval_tokens=512, epochs=100.0, max_steps=4)
    train(cfg, tmp_path / "run", progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    # the same text in another folder (another machine) resumes; other text does not
    (tmp_path / "moved").mkdir()
    for split in ("wiki.train.raw", "wiki.valid.raw"):
        (tmp_path / "moved" / split).write_bytes((tmp_path / "here" / split).read_bytes())
    with pytest.raises(ConfigError, match=r"trained on other text \(sha256 of its train split"):
        train(cfg.replace(data_dir=str(tmp_path / "there"), max_steps=8), tmp_path / "run", progress=False, resume=True)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    summary = train(cfg.replace(data_dir=str(tmp_path / "moved"), max_steps=8), tmp_path / "run", progress=False,
                    resume=True)
    assert summary["status"] == "completed" and summary["steps"] == 8


def test_evaluation_in_chunks_gives_the_mean_over_all_windows_whatever_the_chunk_size():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, depth=1, width=32, max_seq_len=16))
    X, Y = torch.randint(0, 64, (10, 16)), torch.randint(0, 64, (10, 16))
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(model(X).flatten(0, 1), Y.flatten()).item()
    for chunk in (1, 3, 4, 10, 64):  # 3 and 4 leave a short last chunk
        assert evaluate(model, X, Y, chunk, contextlib.nullcontext).item() == pytest.approx(whole, rel=1e-6)


def test_evaluation_runs_in_chunks_of_the_training_micro_batch_not_the_global_batch(tmp_path, monkeypatch):
    chunks = []

    def spy(forward, X, Y, batch_size, autocast):
        chunks.append(batch_size)
        return evaluate(forward, X, Y, batch_size, autocast)

    monkeypatch.setattr(lm, "evaluate", spy)
    train(tiny(tmp_path, batch_size=8, grad_accum=4, max_steps=2), tmp_path / "run", progress=False)
    assert chunks and set(chunks) == {2}


def test_auto_attention_trains_with_sdpa_on_cpu_and_the_record_says_so(tmp_path):
    summary = train(tiny(tmp_path, attention="auto", max_steps=2), tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    assert summary["status"] == "completed"
    assert run.config["attention"] == "auto" and run.config["resolved_attention"] == "sdpa"


def test_flex_attention_on_cpu_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="--attention flex needs a CUDA device"):
        train(tiny(tmp_path, attention="flex", device="cpu"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_run_is_evaluated_once_before_training_unless_asked_not_to(tmp_path):
    train(tiny(tmp_path), tmp_path / "on", progress=False)
    train(tiny(tmp_path, eval_at_start=False), tmp_path / "off", progress=False)
    on, off = read_run(tmp_path / "on").metrics, read_run(tmp_path / "off").metrics
    first = on[0]
    assert (first["step"], first["epoch"], first["tokens"]) == (0, 0.0, 0)
    assert first["train_loss"] is None and first["grad_norm"] is None and first["ema_ratio"] is None
    # The untrained model's loss over a byte vocabulary (256 rows padded): about ln 256, above every later one.
    assert first["val_loss"] == pytest.approx(math.log(256), abs=0.3)
    assert first["val_loss"] > max(row["val_loss"] for row in on[1:])
    untimed = [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in on[1:]]
    assert untimed == numbers(tmp_path / "off")  # evaluating first changes nothing that trains
    assert off[0]["step"] > 0


def test_compare_reads_the_step_0_row_as_having_no_training_columns_not_as_a_missing_value(tmp_path):
    from hlb_gpt.compare import compare, load_runs

    train(tiny(tmp_path), tmp_path / "sweep" / "baseline-s0", progress=False)
    runs, _ = load_runs([tmp_path / "sweep"])
    for column in ("train_loss", "val_loss"):
        group = compare(runs, "mean", "all", column=column).groups[0]
        assert math.isfinite(group.mean), column


# ----------------------------------------------------------------------------------------------- --target-loss


def quick(tmp_path, **changes):
    """A run whose validation loss falls fast: an evaluation every 5 steps, 30 steps."""
    values = dict(dataset="mini", preset="tiny", tokenizer="bytes", data_cache=str(tmp_path / "cache"), depth=1,
                  width=16, seq_len=32, batch_size=4, eval_tokens=1024, lr=1e-2, max_steps=30, evals_per_epoch=2000,
                  device="cpu")
    values.update(changes)
    return RunConfig(**values)


def reachable_target(cfg, run_dir):
    """A loss the run first reaches at an evaluation before its last: (the loss, the step it is reached at)."""
    train(cfg, run_dir, progress=False)
    trained = [(row["step"], row["val_loss"]) for row in read_run(run_dir).metrics if row["step"] > 0]
    target = trained[2][1]
    return target, next(step for step, loss in trained if loss <= target)


@pytest.mark.slow
def test_target_loss_stops_the_run_at_the_first_evaluation_at_or_below_it_and_records_when(tmp_path):
    cfg = quick(tmp_path)
    target, expected = reachable_target(cfg, tmp_path / "free")

    summary = train(cfg.replace(target_loss=target), tmp_path / "stopped", progress=False)
    last = read_run(tmp_path / "stopped").metrics[-1]
    assert summary["status"] == "completed" and summary["target_loss"] == target
    assert summary["steps_to_target"] == expected == summary["steps"] == last["step"] < 30
    assert last["val_loss"] <= target
    assert summary["time_to_target_s"] == last["time_s"] > 0  # training seconds, the metrics rows' clock
    assert read_run(tmp_path / "stopped").summary == summary


def test_a_run_without_a_target_or_that_never_reaches_it_records_no_step_to_it(tmp_path):
    untargeted = train(quick(tmp_path, max_steps=5), tmp_path / "free", progress=False)
    assert untargeted["target_loss"] is None and untargeted["steps_to_target"] is None
    missed = train(quick(tmp_path, max_steps=5, target_loss=0.01), tmp_path / "missed", progress=False)
    assert missed["steps"] == 5 and missed["target_loss"] == 0.01
    assert missed["steps_to_target"] is None and missed["time_to_target_s"] is None


def test_the_untrained_model_reaches_no_target_even_below_its_loss(tmp_path):
    summary = train(quick(tmp_path, max_steps=12, target_loss=100.0), tmp_path / "run", progress=False)
    rows = read_run(tmp_path / "run").metrics
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] <= 100.0
    assert summary["steps_to_target"] == rows[1]["step"] == summary["steps"] > 0


@pytest.mark.slow
def test_a_run_resumed_after_reaching_its_target_trains_no_further_even_when_extended(tmp_path):
    cfg = quick(tmp_path)
    target, expected = reachable_target(cfg, tmp_path / "free")
    stopped = train(cfg.replace(target_loss=target), tmp_path / "run", progress=False)
    rows = read_run(tmp_path / "run").metrics

    again = train(cfg.replace(target_loss=target, max_steps=60), tmp_path / "run", progress=False, resume=True)
    assert again["steps"] == again["steps_to_target"] == expected
    assert again["time_to_target_s"] == stopped["time_to_target_s"]
    assert read_run(tmp_path / "run").metrics == rows  # not one more step or evaluation


@pytest.mark.slow
def test_a_resumed_run_given_a_lower_target_trains_on_to_it(tmp_path):
    cfg = quick(tmp_path)
    target, expected = reachable_target(cfg, tmp_path / "free")
    loose = read_run(tmp_path / "free").metrics[1]["val_loss"]
    first = train(cfg.replace(target_loss=loose), tmp_path / "run", progress=False)
    assert first["steps"] < expected

    summary = train(cfg.replace(target_loss=target), tmp_path / "run", progress=False, resume=True)
    assert summary["steps"] == summary["steps_to_target"] == expected and summary["target_loss"] == target
    assert read_run(tmp_path / "run").config["target_loss"] == target
