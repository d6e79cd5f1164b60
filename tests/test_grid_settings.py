"""Every scalar setting that defines the experiment takes a comma list, crossed with the others; folder names
and compare's labels name what varies, and each point gets its own plain counterpart as baseline."""

from __future__ import annotations

import pytest

from hlb_gpt.compare import group_key
from hlb_gpt.compare.configurations import baseline_config
from hlb_gpt.config import RunConfig
from hlb_gpt.sweep import expand_grid, run_folder_name
from test_components import compare_lines, delta, sweep
from tiny_runs import TINY, run_main

ISSUE_GRID = {"lr": [1e-3, 3e-3], "optimizer": ["adamw", "muon"], "alpha": [0.9], "gain": [0.1], "seed": [0, 1]}


def test_lr_and_optimizer_lists_cross_into_distinct_folders_each_paired_with_its_own_baseline():
    from hlb_gpt.sweep import varying

    base = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", grokfast=True,
                     **{k: v[0] for k, v in ISSUE_GRID.items()})
    configs = expand_grid(base, ISSUE_GRID, grokfast=True, baseline=True)
    vary = varying(ISSUE_GRID)
    names = [run_folder_name(c, vary) for c in configs]
    assert len(configs) == 16 and len(set(names)) == 16
    assert "muon-ema-a0.9-g0.1-lr0.003-s1" in names and "baseline-lr0.001-s0" in names
    plain = {group_key(c.to_dict()): c for c in configs if not c.grokfast}
    assert len(plain) == 4
    for cfg in configs:
        if cfg.grokfast:
            mine = plain[tuple(sorted(baseline_config(cfg.to_dict()).items()))]
            assert (mine.lr, mine.optimizer) == (cfg.lr, cfg.optimizer)


def test_settings_an_optimizer_does_not_own_are_dropped_from_its_points():
    grid = {"optimizer": ["adamw", "muon"], "muon_lr": [0.01, 0.02]}
    base = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", optimizer="muon", muon_lr=0.01)
    configs = expand_grid(base, grid, grokfast=False, baseline=False)
    assert [(c.optimizer, c.muon_lr) for c in configs] == [("adamw", None), ("muon", 0.01), ("muon", 0.02)]


def test_the_length_and_the_bookkeeping_take_no_list(capsys, tmp_path):
    for flag in ("--epochs", "--max-steps", "--keep-checkpoints"):
        code, _, err = run_main(TINY + [flag, "1,2", "--out", str(tmp_path)], capsys)
        assert code == 2, (flag, err)


@pytest.mark.slow
def test_the_issue_sweep_trains_16_runs_and_compare_pairs_each_with_its_lr_and_optimizer(tmp_path, capsys):
    out, _ = sweep(tmp_path, capsys, ["--lr", "1e-3,3e-3", "--optimizer", "adamw,muon", "--grokfast",
                                      "--alpha", "0.9", "--gain", "0.1", "--seed", "0,1"])
    assert len([p for p in out.iterdir() if p.is_dir()]) == 16
    lines = compare_lines(out, capsys)
    assert not any("no baseline" in line for line in lines)
    for optimizer in ("", "muon "):
        for lr in ("0.001", "0.003"):
            assert delta(lines, f"{optimizer}ema α0.9 g0.1 lr={lr}") not in ("n/a", "—")
            assert delta(lines, f"{optimizer}baseline lr={lr}") == "—"
