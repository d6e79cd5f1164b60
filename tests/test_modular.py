import math

import pytest
import torch

from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.records import METRIC_KEYS, read_run
from hlb_gpt.tasks.modular import (EpochSampler, ModularConfig, ModularTransformer, make_modular_optimizer,
                                   make_modular_scheduler, modular_dataset)
from hlb_gpt.train import train

SUMMARY_KEYS = {"status", "best_val_loss", "final_val_loss", "steps", "tokens", "epochs", "train_time_s",
                "wall_time_s", "step_time_s", "memory", "best_val_acc", "final_val_acc", "steps_to_target"}


pytestmark = pytest.mark.usefixtures("one_thread")

def small(**changes):
    """The benchmark's data, batches and schedule with a model small enough for a step in milliseconds."""
    values = dict(task="modular", depth=1, width=32, max_steps=20, device="cpu", checkpoint_every=0)
    values.update(changes)
    return RunConfig(**values)


# ----------------------------------------------------------------------------------------------- data


def test_dataset_holds_all_9312_equations_split_in_disjoint_halves():
    data = modular_dataset(97, seed=0)
    (tx, ty), (vx, vy) = data["train"], data["valid"]
    assert len(tx) == len(ty) == len(vx) == len(vy) == 4656
    pairs = lambda X: {(int(a), int(b)) for a, b in X[:, [0, 2]]}  # noqa: E731
    train, valid = pairs(tx), pairs(vx)
    assert len(train) == len(valid) == 4656 and not train & valid
    assert train | valid == {(x, y) for x in range(97) for y in range(1, 97)}


def test_sequences_are_x_op_y_eq_and_the_answer_is_the_product_mod_p():
    X, y = modular_dataset(97, seed=0)["train"]
    assert X.dtype == y.dtype == torch.int64 and X.shape == (4656, 4)
    assert (X[:, 1] == 98).all() and (X[:, 3] == 97).all()  # op = p + 1, eq = p
    assert torch.equal(y, X[:, 0] * X[:, 2] % 97)
    assert X[:, [0, 2]].max() < 97 and X[:, 2].min() == 1


def test_the_split_is_fixed_by_the_seed():
    a, b, c = modular_dataset(seed=1), modular_dataset(seed=1), modular_dataset(seed=2)
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["valid"][1], b["valid"][1])
    assert not torch.equal(a["train"][0], c["train"][0])


def test_dataset_rejects_a_degenerate_fraction():
    with pytest.raises(ValueError, match="train_fraction"):
        modular_dataset(train_fraction=1.0)


def test_each_epoch_is_a_seeded_shuffle_cut_into_batches_with_the_remainder_last():
    sampler = EpochSampler(4656, 512, seed=3, device=torch.device("cpu"))
    assert sampler.steps_per_epoch == 10
    epochs = [[sampler.next() for _ in range(10)] for _ in range(2)]
    for batches in epochs:
        assert [len(b) for b in batches] == [512] * 9 + [48]
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(4656))
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))
    again = EpochSampler(4656, 512, seed=3, device=torch.device("cpu"))
    assert torch.equal(again.next(), epochs[0][0])


def test_a_restored_sampler_continues_with_the_same_batches():
    sampler = EpochSampler(100, 32, seed=0, device=torch.device("cpu"))
    for _ in range(6):  # into the second epoch of 4 batches
        sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(5)]
    restored = EpochSampler(100, 32, seed=0, device=torch.device("cpu"))
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [restored.next() for _ in range(5)]))


# ----------------------------------------------------------------------------------------------- model


def test_the_answer_is_read_at_the_last_position_of_the_causal_model():
    torch.manual_seed(0)
    model = ModularTransformer(ModularConfig(depth=2, width=32))
    X, _ = modular_dataset(seed=0)["valid"]
    answer = model(X[:64])
    every = model(X[:64], every_position=True)
    assert answer.shape == (64, 99) and every.shape == (64, 4, 99)
    torch.testing.assert_close(answer, every[:, -1], rtol=1e-5, atol=1e-5)


def test_no_position_sees_a_later_token():
    torch.manual_seed(0)
    model = ModularTransformer(ModularConfig(depth=2, width=32))
    X, _ = modular_dataset(seed=0)["valid"]
    changed = X[:16].clone()
    changed[:, 2] = (changed[:, 2] + 1) % 97  # change y
    before, after = model(X[:16], every_position=True), model(changed, every_position=True)
    torch.testing.assert_close(before[:, :2], after[:, :2])
    assert not torch.allclose(before[:, 2:], after[:, 2:])


def test_the_model_has_the_published_size():
    # 2 blocks of width 128 with 4x MLPs, 99-token vocabulary, 4 learned positions, untied bias-free head.
    model = ModularTransformer(ModularConfig())
    block = 2 * 2 * 128 + (3 * 128 * 128 + 3 * 128) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128)
    assert model.num_params() == 99 * 128 + 4 * 128 + 2 * block + 2 * 128 + 128 * 99


def test_the_optimizer_is_adam_with_coupled_l2_decay_and_a_warmup_from_zero():
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = make_modular_optimizer(params, lr=1e-3, weight_decay=0.005, device=torch.device("cpu"))
    assert type(opt) is torch.optim.Adam  # not AdamW: the decay is added to the gradient, as published
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["weight_decay"] == 0.005
    sched = make_modular_scheduler(opt, warmup_steps=10)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        params[0].grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10:] == [1e-3] * 3


# ----------------------------------------------------------------------------------------------- the run


def test_a_run_records_accuracy_with_every_standard_metric(tmp_path):
    summary = train(small(max_steps=20), tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    assert summary["status"] == "completed" == run.status
    assert SUMMARY_KEYS <= set(run.summary)
    assert run.summary["steps_to_target"] is None and run.summary["steps"] == 20
    assert [row["step"] for row in run.metrics] == [0, 10, 20]  # before training, then one per epoch of 10 steps
    assert run.metrics[0]["train_acc"] is None and 0 <= run.metrics[0]["val_acc"] <= 1
    for row in run.metrics[1:]:
        assert set(METRIC_KEYS) | {"val_acc", "train_acc"} <= set(row)
        assert 0 <= row["val_acc"] <= 1 and 0 <= row["train_acc"] <= 1
        assert row["ema_ratio"] is None  # no filter
    assert run.metrics[-1]["tokens"] == 2 * 4656 == run.summary["tokens"]
    assert run.metrics[-1]["epoch"] == 2.0
    assert run.summary["best_val_acc"] == max(row["val_acc"] for row in run.metrics[1:])  # after training began
    assert run.summary["final_val_acc"] == run.metrics[-1]["val_acc"]
    assert run.config["task"] == "modular" and run.config["modular"]["steps_per_epoch"] == 10


def test_max_steps_is_respected_even_mid_epoch(tmp_path):
    summary = train(small(max_steps=15), tmp_path / "run", progress=False)
    assert summary["steps"] == 15 and summary["tokens"] == 9 * 512 + 48 + 5 * 512
    assert [row["step"] for row in read_run(tmp_path / "run").metrics] == [0, 10, 15]


def test_without_max_steps_the_run_lasts_epochs_times_ten_steps(tmp_path):
    summary = train(small(max_steps=None, epochs=2), tmp_path / "run", progress=False)
    assert summary["steps"] == 20


def test_the_run_stops_at_the_first_evaluation_that_reaches_the_target(tmp_path):
    cfg = small(max_steps=60)
    train(cfg, tmp_path / "free", progress=False)
    accs = [(row["step"], row["val_acc"]) for row in read_run(tmp_path / "free").metrics[1:]]  # trained
    target = max(acc for _, acc in accs[:-1])
    assert target > 0
    expected = next(step for step, acc in accs if acc >= target)

    summary = train(cfg.replace(target_acc=target), tmp_path / "stopped", progress=False)
    assert summary["status"] == "completed"
    assert summary["steps_to_target"] == expected == summary["steps"] < 60
    assert read_run(tmp_path / "stopped").metrics[-1]["val_acc"] >= target


def test_a_target_the_untrained_model_meets_is_reached_at_the_first_trained_evaluation_that_meets_it(tmp_path):
    summary = train(small(max_steps=30, target_acc=0.001), tmp_path / "run", progress=False)
    rows = read_run(tmp_path / "run").metrics
    assert rows[0]["step"] == 0 and rows[0]["val_acc"] >= 0.001  # the untrained model already meets it
    assert summary["steps_to_target"] == 10 == summary["steps"]  # and the run stops there, as it records
    assert summary["best_val_acc"] == summary["final_val_acc"] == rows[1]["val_acc"]


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_the_grokfast_filter_acts_and_reports_its_ratio(tmp_path, kind):
    cfg = small(grokfast=True, filter=kind, window=5, max_steps=20)
    train(cfg, tmp_path / "filtered", progress=False)
    train(cfg.replace(grokfast=False), tmp_path / "plain", progress=False)
    filtered, plain = read_run(tmp_path / "filtered"), read_run(tmp_path / "plain")
    trained = [row for row in filtered.metrics if row["step"] > 0]  # step 0: the evaluation before training
    assert all(row["ema_ratio"] is not None and row["ema_ratio"] > 0 for row in trained)
    assert filtered.summary["memory"]["filter_bytes"] > 0 == plain.summary["memory"]["filter_bytes"]
    assert filtered.metrics[-1]["val_loss"] != plain.metrics[-1]["val_loss"]


def test_gradient_accumulation_trains_like_one_batch(tmp_path):
    one = train(small(max_steps=10), tmp_path / "one", progress=False)
    two = train(small(max_steps=10, grad_accum=2), tmp_path / "two", progress=False)
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4)


def test_bf16_autocast_is_opt_in_and_trains(tmp_path):
    summary = train(small(max_steps=10, precision="bf16"), tmp_path / "bf16", progress=False)
    default = train(small(max_steps=10), tmp_path / "auto", progress=False)
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])
    assert summary["final_val_loss"] != default["final_val_loss"]  # bf16 was really used


def test_settings_without_meaning_for_the_task_are_rejected_when_the_config_is_built():
    with pytest.raises(ConfigError, match="--optimizer"):
        small(optimizer="grokadamw")
    with pytest.raises(ConfigError, match="--gate"):
        small(gate="relu")


def test_checkpoints_default_to_every_100_epochs_here_and_every_epoch_for_lm():
    # An epoch is 10 steps here, and an MA checkpoint is 176 MB: one per epoch would dominate the run.
    assert RunConfig(task="modular").checkpoint_cadence.epochs == 100
    assert RunConfig(task="lm").checkpoint_cadence.epochs == 1
    assert not RunConfig(task="modular", checkpoint_every=0).checkpoint_cadence


# ----------------------------------------------------------------------------------------------- the claim


@pytest.mark.slow
def test_grokfast_ema_reaches_95_percent_validation_accuracy_within_2000_steps(tmp_path):
    # Seed 2 got there in 940 steps on one thread (seeds 0 and 1: 1,500 and 1,300); the published run, 910.
    cfg = RunConfig(task="modular", grokfast=True, alpha=0.98, gain=2.0, weight_decay=0.005, target_acc=0.95,
                    max_steps=2000, seed=2, device="cpu", checkpoint_every=0)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "completed"
    assert summary["steps_to_target"] is not None and summary["steps_to_target"] <= 2000
    assert math.isclose(summary["final_val_acc"], summary["best_val_acc"]) and summary["final_val_acc"] >= 0.95


def test_a_modular_sweep_from_the_command_line_compares_on_steps_to_target(tmp_path, capsys):
    from hlb_gpt.cli import main

    sweep = tmp_path / "sweep"
    args = ["--task", "modular", "--depth", "1", "--width", "32", "--max-steps", "20", "--device", "cpu",
            "--grokfast", "--baseline", "--seed", "0,1", "--target-acc", "0.9", "--out", str(sweep)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 4 and all(read_run(sweep / r).summary["target_acc"] == 0.9 for r in runs)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.endswith(", val acc 0.9 not reached") and "best val acc 0.0" in line for line in lines) == 4
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(sweep), "--metric", "steps_to_target", "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    # 20 steps of a tiny model reach no 90%: both configurations are +inf, and say so.
    assert "| baseline | 2 | inf ± n/a |" in out and "| ema α0.98 g2 | 2 | inf ± n/a |" in out
    assert "2 of 2 run(s) never reached the target (the longest ran 20 steps)" in out
    # The accuracy curves; no statistic-against-gain chart, since no configuration has a finite statistic.
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["val_acc_vs_epoch.png"]
    assert (tmp_path / "plots" / "val_acc_vs_epoch.png").stat().st_size > 10_000
