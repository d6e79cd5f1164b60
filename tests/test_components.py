"""Filters and optimizers are registered components: a new one, registered from here alone, is swept, named,
estimated, paired with its baseline and labelled by compare with no file of the package changed."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

import pytest

from hlb_gpt import components, footprint
from hlb_gpt.components import Filter, Optimizer
from hlb_gpt.compare import group_key, short_label
from hlb_gpt.compare.configurations import baseline_config, normalise_config
from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.grokfast import NoFilter
from hlb_gpt.records import read_run
from hlb_gpt.sweep import expand_grid, run_folder_name
from tiny_runs import TINY, run_main

SMALL = ["--depth", "1", "--width", "16", "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "1024",
         "--max-steps", "2", "--checkpoint-every", "0", "--device", "cpu", "-q"]


class SignFilter(NoFilter):
    """g += gain * sign(running sum of g): one parameter-sized copy of state."""

    kind = "sign"

    def __init__(self, named_params, gain: float) -> None:
        super().__init__()
        self.params = [p for _, p in named_params]
        self.gain = gain
        self.sums = [torch.zeros_like(p) for p in self.params]

    def step(self, found_inf=None) -> None:
        if found_inf is not None and found_inf.item():
            return
        for p, total in zip(self.params, self.sums):
            if p.grad is not None:
                total.add_(p.grad)
                p.grad.add_(torch.sign(total), alpha=self.gain)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums)


SIGN = Filter("sign", settings=("gain",), shown=(("gain", "g", "g"),),
              build=lambda cfg, named_params, dtype, compile: SignFilter(named_params, cfg.gain),
              copies=lambda cfg: 1)
SGD = Optimizer("sgd", build=lambda cfg, groups, device_type, compile: torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9),
                plain="sgd", title="SGD", state_copies=1)  # its momentum


@pytest.fixture
def registered():
    components.register(SIGN)
    components.register(SGD)
    yield
    del components.FILTERS["sign"], components.OPTIMIZERS["sgd"]


def sweep(tmp_path, capsys, args):
    out = tmp_path / "out"
    code, stdout, err = run_main(TINY + SMALL + args + ["--baseline", "--out", str(out),
                                                         "--data-cache", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    return out, stdout


def compare_lines(out, capsys) -> list[str]:
    code, stdout, err = run_main(["compare", str(out)], capsys)
    assert code == 0, err
    return stdout.splitlines()


def delta(lines: list[str], label: str) -> str:
    """The `Δ vs baseline` cell of compare's row for `label`."""
    header = next(line for line in lines if line.startswith("| configuration"))
    row = next(line for line in lines if line.startswith(f"| {label} |"))
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return dict(zip(cells(header), cells(row)))["Δ vs baseline"]


@pytest.mark.slow
def test_a_filter_registered_from_a_test_is_swept_named_estimated_and_paired_by_compare(registered, tmp_path, capsys):
    out, _ = sweep(tmp_path, capsys, ["--grokfast", "--filter", "sign", "--gain", "0.1,1"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["baseline-s0", "sign-g0.1-s0", "sign-g1-s0"]
    runs = {name: read_run(out / name) for name in ("baseline-s0", "sign-g0.1-s0", "sign-g1-s0")}
    assert all(run.status == "completed" for run in runs.values())
    config = runs["sign-g1-s0"].config
    assert short_label(config) == "sign g1"
    assert baseline_config(config) == normalise_config(runs["baseline-s0"].config)
    # The settings the sign filter does not read do not split its configurations.
    assert group_key({**config, "alpha": 0.5, "window": 7}) == group_key(config)
    cfg = RunConfig.from_dict(config)
    assert footprint.estimate(cfg, 1000, 256, "fp32", False).filter_state == 1000 * 4
    lines = compare_lines(out, capsys)
    for label in ("sign g0.1", "sign g1"):
        assert float(delta(lines, label)) != 0  # paired with the baseline: a difference, not n/a
    assert not any("no baseline" in line for line in lines)


@pytest.mark.slow
def test_an_optimizer_registered_from_a_test_gets_its_own_baseline_folder_and_label(registered, tmp_path, capsys):
    out, _ = sweep(tmp_path, capsys, ["--optimizer", "sgd", "--grokfast", "--alpha", "0.9", "--gain", "0.1,1"])
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["sgd-ema-a0.9-g0.1-s0", "sgd-ema-a0.9-g1-s0", "sgd-s0"]
    baseline = read_run(out / "sgd-s0").config
    assert baseline["optimizer"] == "sgd" and not baseline["grokfast"]
    filtered = read_run(out / "sgd-ema-a0.9-g1-s0").config
    assert short_label(filtered) == "sgd ema α0.9 g1" and short_label(baseline) == "sgd baseline"
    assert baseline_config(filtered) == normalise_config(baseline)
    # Weights, gradients and the momentum; the EMA filter's mu beside them.
    need = footprint.estimate(RunConfig.from_dict(filtered), 1000, 256, "fp32", False)
    assert (need.training_state, need.filter_state) == (1000 * 3 * 4, 1000 * 4)
    lines = compare_lines(out, capsys)
    for label in ("sgd ema α0.9 g0.1", "sgd ema α0.9 g1"):
        assert float(delta(lines, label)) != 0
    assert delta(lines, "sgd baseline") == "—"
    assert not any("no baseline" in line for line in lines)


def test_the_registry_names_todays_runs_as_before():
    base = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", grokfast=True)
    names = [run_folder_name(c) for c in expand_grid(base.replace(alpha=0.9, gain=0.1), {}, True, True)]
    assert names == ["baseline-s0", "ema-a0.9-g0.1-s0"]
    ma = base.replace(filter="ma", window=100, gain=5.0, seed=1)
    assert [run_folder_name(c) for c in expand_grid(ma, {}, True, True)] == ["baseline-s1", "ma-w100-g5-s1"]
    muon = base.replace(optimizer="muon", alpha=0.9, gain=0.1)
    assert [run_folder_name(c) for c in expand_grid(muon, {}, True, True)] == ["muon-s0", "muon-ema-a0.9-g0.1-s0"]
    grok = base.replace(optimizer="grokadamw", grokfast=False)
    assert [run_folder_name(c) for c in expand_grid(grok, {}, False, True)] == ["baseline-s0", "grokadamw-a0.98-g2-s0"]


def test_an_unregistered_filter_or_optimizer_is_refused(capsys, tmp_path):
    for args in (["--grokfast", "--filter", "sign"], ["--optimizer", "sgd"]):
        code, _, err = run_main(TINY + args + ["--out", str(tmp_path)], capsys)
        assert code == 2 and "is not one of 'ema', 'ma'" in err or "is not one of 'adamw', 'grokadamw', 'muon'" in err, err
        assert len(err.strip().splitlines()) == 1, err


def spelled(names: str, allowed: tuple[str, ...]) -> list[str]:
    """The lines of the package outside the `allowed` folders that spell one of `names` as a string."""
    package = Path(components.__file__).parent.parent
    pattern = re.compile(rf'"({names})"')
    return [f"{path.relative_to(package)}:{n}: {line.strip()}"
            for path in sorted(package.rglob("*.py")) if path.parent.name not in allowed
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]


def test_no_module_outside_the_components_spells_a_filter_or_optimizer_name():
    assert spelled("muon|ema|ma|grokadamw", ("components",)) == []


def test_no_module_outside_the_components_and_the_tasks_spells_a_task_name():
    assert spelled("lm|modular", ("components", "tasks")) == []


def test_a_task_s_refusals_are_its_declaration_s(monkeypatch):
    with pytest.raises(ConfigError, match="--task modular has no gated blocks; drop --gate relu"):
        RunConfig(task="modular", gate="relu")
    monkeypatch.setitem(components.TASKS, "modular", replace(components.TASKS["modular"], check=lambda cfg: None))
    assert RunConfig(task="modular", gate="relu").gate == "relu"


def test_the_training_state_estimate_counts_the_copies_each_optimizer_keeps(registered):
    def state(**changes) -> int:
        return footprint.estimate(RunConfig(**changes), 1000, 256, "fp32", False).training_state

    # Weights and gradients, then AdamW's two moments, GrokAdamW's EMA besides, SGD's momentum.
    assert state() == 1000 * 4 * (2 + 2)
    assert state(optimizer="grokadamw") == 1000 * 4 * (2 + 3)
    assert state(optimizer="sgd") == 1000 * 4 * (2 + 1)
    # Muon's matrices keep one copy, the rest AdamW's two: two is its bound.
    assert state(optimizer="muon") == 1000 * 4 * (2 + 2)
    components.register(Optimizer("plain", build=SGD.build, plain="plain"))
    try:  # one that does not say: as many as AdamW
        assert state(optimizer="plain") == 1000 * 4 * (2 + 2)
    finally:
        del components.OPTIMIZERS["plain"]
