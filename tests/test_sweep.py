from hlb_gpt.config import RunConfig
from hlb_gpt.records import RunWriter, read_run
from hlb_gpt.sweep import expand_grid, run_folder_name, run_sweep

BASE = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes")


def _fake_train(fail_names=()):
    calls = []

    def train(cfg, run_dir, progress=True, resume=False):
        calls.append(run_dir.name)
        writer = RunWriter(run_dir)
        writer.write_config(cfg.to_dict())
        if run_dir.name in fail_names:
            raise RuntimeError("boom")
        summary = {"status": "completed", "best_val_loss": 1.0}
        writer.write_summary(summary)
        return summary

    return train, calls


def test_a_single_run_is_a_sweep_of_one():
    configs = expand_grid(BASE, {}, grokfast=False, baseline=False)
    assert len(configs) == 1 and not configs[0].grokfast
    assert run_folder_name(configs[0]) == "baseline-s0"


def test_grokfast_grid_with_baseline_has_every_point_for_every_seed():
    grid = {"alpha": [0.8, 0.99], "gain": [0.1, 5.0], "seed": [0, 1]}
    configs = expand_grid(BASE.replace(grokfast=True), grid, grokfast=True, baseline=True)
    assert len(configs) == 10
    for seed in (0, 1):
        mine = [c for c in configs if c.seed == seed]
        assert sum(not c.grokfast for c in mine) == 1
        assert {(c.alpha, c.gain) for c in mine if c.grokfast} == {(0.8, 0.1), (0.8, 5.0), (0.99, 0.1), (0.99, 5.0)}
    assert len({run_folder_name(c) for c in configs}) == 10


def test_without_grokfast_only_the_unfiltered_configuration_runs():
    configs = expand_grid(BASE, {"alpha": [0.8, 0.9], "seed": [0, 1, 2]}, grokfast=False, baseline=False)
    assert [c.seed for c in configs] == [0, 1, 2] and not any(c.grokfast for c in configs)


def test_ma_points_vary_window_and_gain_and_name_them():
    configs = expand_grid(BASE.replace(grokfast=True, filter="ma"), {"filter": ["ma"], "window": [10, 100]},
                          grokfast=True, baseline=False)
    assert [run_folder_name(c) for c in configs] == ["ma-w10-g2-s0", "ma-w100-g2-s0"]


def test_model_knobs_in_the_grid_appear_in_run_folder_names():
    configs = expand_grid(BASE, {"depth": [2, 4]}, grokfast=False, baseline=False)
    assert [run_folder_name(c, vary=["depth"]) for c in configs] == ["baseline-d2-s0", "baseline-d4-s0"]


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    configs = expand_grid(BASE, {"seed": [0, 1, 2]}, grokfast=False, baseline=False)
    train, calls = _fake_train(fail_names={"baseline-s1"})
    results = run_sweep(configs, tmp_path, train_fn=train, progress=False)
    assert [r.status for r in results] == ["completed", "failed", "completed"]
    assert read_run(tmp_path / "baseline-s1").summary["error"] == "RuntimeError: boom"


def test_rerunning_a_sweep_skips_completed_runs_and_retries_the_rest(tmp_path):
    configs = expand_grid(BASE, {"seed": [0, 1]}, grokfast=False, baseline=False)
    train, _ = _fake_train(fail_names={"baseline-s1"})
    run_sweep(configs, tmp_path, train_fn=train, progress=False)
    train, calls = _fake_train()
    results = run_sweep(configs, tmp_path, train_fn=train, progress=False)
    assert calls == ["baseline-s1"]
    assert [r.status for r in results] == ["completed", "completed"]


def test_a_completed_run_asked_for_another_target_loss_continues_instead_of_being_skipped(tmp_path):
    configs = [BASE.replace(target_loss=3.5)]
    train, _ = _fake_train()
    run_sweep(configs, tmp_path, train_fn=train, progress=False)
    train, calls = _fake_train()
    run_sweep(configs, tmp_path, train_fn=train, progress=False)
    assert calls == []  # the same target: done
    run_sweep([BASE.replace(target_loss=3.0)], tmp_path, train_fn=train, progress=False)
    assert calls == ["baseline-s0"]  # its summary was for 3.5: the trainer stops at once if 3.0 was reached too
    assert read_run(tmp_path / "baseline-s0").config["target_loss"] == 3.0


def test_a_real_grid_sweep_pairs_seeds_and_survives_one_broken_run(tmp_path):
    base = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", data_cache=str(tmp_path / "cache"),
                     depth=1, width=32, seq_len=32, batch_size=4, epochs=0.0003, evals_per_epoch=20_000,
                     eval_tokens=1024, grokfast=True)
    grid = {"alpha": [0.8, 0.99], "gain": [0.1, 5.0], "seed": [0, 1]}
    configs = expand_grid(base, grid, grokfast=True, baseline=True)
    broken = configs[3]
    broken.width = 12  # bypasses validation: the model refuses it when the run starts
    results = run_sweep(configs, tmp_path / "sweep", progress=False)

    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(folders) == 10
    statuses = {r.name: r.status for r in results}
    assert statuses.pop(run_folder_name(broken)) == "failed"
    assert set(statuses.values()) == {"completed"}
    runs = [read_run(tmp_path / "sweep" / name) for name in folders]
    for seed in (0, 1):
        mine = [r.config for r in runs if r.config["seed"] == seed]
        assert len(mine) == 5
        assert sum(not c["grokfast"] for c in mine) == 1
        assert {(c["alpha"], c["gain"]) for c in mine if c["grokfast"]} == {(0.8, 0.1), (0.8, 5.0), (0.99, 0.1), (0.99, 5.0)}
    # Paired design: a seed fixes the initial weights and the batches, and the EMA filter leaves the first
    # gradient unchanged, so after step 1 every run of a seed is the same model; seeds differ.
    after_step_1 = {}
    for r in runs:
        if r.status == "completed":
            assert r.metrics[1]["step"] == 1  # after the evaluation at step 0
            after_step_1.setdefault(r.config["seed"], set()).add(r.metrics[1]["val_loss"])
    assert all(len(v) == 1 for v in after_step_1.values())
    assert after_step_1[0] != after_step_1[1]
