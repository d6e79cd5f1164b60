import dataclasses

import pytest

from hlb_gpt.config import BOOKKEEPING, GRID_KEYS, PRESETS, Cadence, ConfigError, RunConfig, check_resumable


def test_preset_fills_every_unset_model_and_batch_setting():
    cfg = RunConfig(preset="tiny")
    tiny = PRESETS["tiny"]
    assert (cfg.depth, cfg.width, cfg.seq_len, cfg.batch_size, cfg.lr, cfg.eval_tokens) == (
        tiny.depth, tiny.width, tiny.seq_len, tiny.batch_size, tiny.lr, tiny.eval_tokens)


def test_explicit_values_override_the_preset():
    cfg = RunConfig(preset="hlb", depth=2, lr=1e-3)
    assert cfg.depth == 2 and cfg.lr == 1e-3 and cfg.width == PRESETS["hlb"].width


def test_config_round_trips_through_a_dict():
    cfg = RunConfig(preset="tiny", grokfast=True, alpha=0.9, seed=3)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_ignores_record_only_keys():
    values = {**RunConfig(preset="tiny").to_dict(), "versions": {"torch": "x"}, "n_params": 5}
    assert RunConfig.from_dict(values) == RunConfig(preset="tiny")


@pytest.mark.parametrize("changes, flag", [
    ({"alpha": 1.0}, "--alpha"),
    ({"alpha": -0.1}, "--alpha"),
    ({"gain": -1.0}, "--gain"),
    ({"window": 0}, "--window"),
    ({"epochs": 0}, "--epochs"),
    ({"epochs": -1.0}, "--epochs"),
    ({"width": 100}, "--width"),
    ({"depth": 0}, "--depth"),
    ({"dataset": "wikitext-9"}, "--dataset"),
    ({"tokenizer": "sentencepiece"}, "--tokenizer"),
    ({"gate": "tanh"}, "--gate"),
    ({"batch_size": 6, "grad_accum": 4}, "--grad-accum"),
    ({"lr": 0.0}, "--lr"),
    ({"weight_decay": -0.1}, "--weight-decay"),
    ({"clip": 0.0}, "--clip"),
    ({"evals_per_epoch": 0}, "--evals-per-epoch"),
    ({"eval_tokens": -5}, "--eval-tokens"),
    ({"data_dir": "/nonexistent/wikitext"}, "--data-dir"),
    ({"grokfast": True, "optimizer": "grokadamw"}, "--grokfast"),
])
def test_bad_settings_are_rejected_with_a_message_naming_the_flag(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        RunConfig(preset="tiny", **changes)


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="--alpha"):
        RunConfig(preset="tiny").replace(alpha=2.0)


def test_bookkeeping_is_one_list_that_resume_accepts_and_that_may_change_on_resume_extends():
    from hlb_gpt.config import BOOKKEEPING, MAY_CHANGE_ON_RESUME, check_resumable

    assert BOOKKEEPING < MAY_CHANGE_ON_RESUME
    assert {"epochs", "max_steps", "target_acc", "device", "compile"} <= MAY_CHANGE_ON_RESUME - BOOKKEEPING
    saved = RunConfig(preset="tiny").to_dict()
    changed = RunConfig(preset="tiny", checkpoint_every=0.25, keep_checkpoints=9, wandb=True, wandb_project="x",
                        data_cache="/elsewhere", epochs=3.0, max_steps=10, device="cpu", compile=False)
    check_resumable(changed, saved, "run")
    for other in (dict(precision="bf16"), dict(lr=0.5), dict(dataset="mini"), dict(tokenizer="bytes")):
        with pytest.raises(ConfigError, match="other settings"):
            check_resumable(RunConfig(preset="tiny", **other), saved, "run")


@pytest.mark.parametrize("given, recorded, cadence", [
    (None, None, Cadence(epochs=1.0, min_seconds=600.0)),  # the preset's, at least 10 minutes apart
    (2, 2.0, Cadence(epochs=2.0)),
    ("0.5", 0.5, Cadence(epochs=0.5)),
    ("0", 0.0, Cadence()),
    ("30m", "30m", Cadence(seconds=1800.0)),
    (" 90S ", "90s", Cadence(seconds=90.0)),
    ("2h", "2h", Cadence(seconds=7200.0)),
    ("0.001m", "0.001m", Cadence(seconds=0.06)),
    ("0m", 0.0, Cadence()),
])
def test_checkpoint_every_is_epochs_as_a_number_or_time_with_a_unit_and_is_recorded_as_given(given, recorded, cadence):
    cfg = RunConfig(preset="tiny", checkpoint_every=given)
    assert cfg.checkpoint_every == recorded and type(cfg.checkpoint_every) is type(recorded)
    assert cfg.checkpoint_cadence == cadence
    assert bool(cfg.checkpoint_cadence) == (recorded != 0)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("given", ["abc", "-1", "-3m", "5x", "m", "30 min", "nan", "inf", "", "1e999s"])
def test_a_checkpoint_cadence_that_is_neither_epochs_nor_a_time_is_rejected_naming_the_flag(given):
    with pytest.raises(ConfigError) as exc:
        RunConfig(preset="tiny", checkpoint_every=given)
    assert str(exc.value) == ("--checkpoint-every must be a number of epochs or minutes like 30m (also 90s, 2h), "
                              f"0 for none (got {given!r})")


def test_a_run_resumes_under_a_changed_checkpoint_cadence():
    saved = RunConfig(preset="tiny", checkpoint_every=1.0).to_dict()
    check_resumable(RunConfig(preset="tiny", checkpoint_every="30m"), saved, "run")
    with pytest.raises(ConfigError, match="--lr"):
        check_resumable(RunConfig(preset="tiny", checkpoint_every="30m", lr=1.0), saved, "run")


def test_every_setting_carries_the_help_of_its_flag():
    # A field added without `setting(...)` would get a flag without help and no README row.
    undocumented = [f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("help")]
    assert not undocumented


def test_every_scalar_experiment_setting_is_a_grid_but_the_length_and_the_bookkeeping():
    assert set(GRID_KEYS) == {"dataset", "tokenizer", "depth", "width", "gate", "seq_len", "batch_size", "optimizer",
                              "lr", "weight_decay", "warmup_steps", "clip", "grok_kappa", "grok_gamma", "muon_lr",
                              "muon_momentum", "filter", "alpha", "gain", "window", "filter_dtype", "seed",
                              "lora_rank", "lora_alpha", "train_tokens_limit"}
    assert not set(GRID_KEYS) & (BOOKKEEPING | {"epochs", "max_steps"})


@pytest.mark.parametrize("settings, kind", [
    ({}, "baseline"),
    ({"alpha": 0.5, "filter": "ma"}, "baseline"),  # filter settings without --grokfast: unused
    ({"grokfast": True}, "ema"),
    ({"grokfast": True, "filter": "ma"}, "ma"),
    ({"optimizer": "grokadamw"}, "grokadamw"),
])
def test_a_runs_kind_is_read_alike_from_its_config_and_its_recorded_settings(settings, kind):
    cfg = RunConfig(preset="tiny", **settings)
    assert cfg.kind == kind
    assert RunConfig.kind_of(cfg.to_dict()) == kind
    assert RunConfig.kind_of(settings) == kind  # a config.json recorded before a setting existed lacks its key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0])
def test_a_target_loss_must_be_a_positive_finite_number(value):
    with pytest.raises(ConfigError, match=r"--target-loss must be a positive number"):
        RunConfig(preset="tiny", target_loss=value)


def test_each_task_stops_at_its_own_kind_of_target():
    assert RunConfig(preset="tiny", target_loss=3.5).target_loss == 3.5
    assert RunConfig(task="modular", target_acc=0.95).target_acc == 0.95
    with pytest.raises(ConfigError, match="--target-loss is not a target of --task modular, which stops at its "
                                          "--target-acc"):
        RunConfig(task="modular", target_loss=3.5)
    with pytest.raises(ConfigError, match="--target-acc is not a target of --task lm, which stops at its "
                                          "--target-loss"):
        RunConfig(preset="tiny", target_acc=0.95)


def test_a_target_loss_may_change_on_resume_like_the_run_length():
    saved = RunConfig(preset="tiny", target_loss=3.5).to_dict()
    check_resumable(RunConfig(preset="tiny", target_loss=3.0), saved, "run")
    check_resumable(RunConfig(preset="tiny"), saved, "run")
