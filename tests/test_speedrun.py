import math

import pytest

from hlb_gpt.compare import Metric, load_runs, to_loss
from hlb_gpt.config import RunConfig
from hlb_gpt.records import read_run
from hlb_gpt.train import train
from tiny_runs import TINY_LM, bench_fixture

speedrun = bench_fixture("speedrun")


@pytest.mark.slow
def test_speedrun_reads_each_target_from_the_runs_records_and_trains_what_one_run_would(speedrun, tmp_path):
    cfg = RunConfig(**{**TINY_LM, "lr": 1e-2, "evals_per_epoch": 2000, "epochs": 1e6},
                    data_cache=str(tmp_path / "cache"))
    reached = speedrun.run_to_targets(cfg, tmp_path / "legs", [4.5, 4.0, 0.5], max_steps=30)

    [run] = load_runs([tmp_path / "legs"])[0]
    for target in (4.5, 4.0):
        assert reached[target] == (to_loss(run, Metric("time_to", target=target)),
                                   to_loss(run, Metric("steps_to", target=target)))
    assert reached[4.5][1] < reached[4.0][1] < 30 and reached[0.5] is None  # 0.5: not within 30 steps
    assert math.isinf(to_loss(run, Metric("steps_to", target=0.5)))

    train(cfg.replace(max_steps=30), tmp_path / "one", progress=False)
    legs, one = read_run(tmp_path / "legs").metrics, read_run(tmp_path / "one").metrics
    assert [(r["step"], r["val_loss"]) for r in legs] == [(r["step"], r["val_loss"]) for r in one]
