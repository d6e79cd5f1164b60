"""The pre-flight checks of memory and disk: what a run will need, estimated from its config before any work, and
read on the device the rank will train on."""

import pytest
import torch

from hlb_gpt import train as train_module
from hlb_gpt.config import RunConfig
from tiny_runs import TINY, run_main


class FakeCuda:
    """torch.cuda on a machine with `count` GPUs of `free` bytes each, recording which device is current and which
    device each memory query names. `set_device` fails as CUDA does for a GPU that does not exist."""

    def __init__(self, monkeypatch, count: int, free: int = 80 * 2**30) -> None:
        self.count, self.free = count, free
        self.current: int | None = None  # no context yet
        self.events: list[tuple[str, int | None]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "mem_get_info", self.mem_get_info)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100 or newer

    def set_device(self, device) -> None:
        index = torch.device(device).index
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.current = index
        self.events.append(("set_device", index))

    def mem_get_info(self, device=None):
        index = torch.device(device).index if device is not None else None
        # A device without an index means the current one, which without set_device is GPU 0.
        self.events.append(("mem_get_info", self.current if index is None else index))
        if self.current is None:
            self.current = 0  # reading memory opened a context on GPU 0
        return self.free, self.free


def torchrun_env(monkeypatch, rank: int, world: int, local_world: int | None = None) -> None:
    for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world,
                        "LOCAL_WORLD_SIZE": local_world or world}.items():
        monkeypatch.setenv(name, str(value))


# --- the device the check reads ------------------------------------------------------------------------------


def test_under_torchrun_each_rank_checks_the_memory_of_its_own_gpu_after_making_it_current(monkeypatch):
    gpus = FakeCuda(monkeypatch, count=4)
    torchrun_env(monkeypatch, rank=2, world=4)
    train_module.check_memory(RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", device="cuda", grokfast=True))
    assert gpus.events == [("set_device", 2), ("mem_get_info", 2)]


def test_more_torchrun_ranks_than_gpus_are_refused_in_one_line_on_every_rank(monkeypatch, capsys, tmp_path):
    for rank in (0, 1):
        gpus = FakeCuda(monkeypatch, count=1)
        torchrun_env(monkeypatch, rank=rank, world=2)
        code, _, err = run_main(TINY + ["--device", "cuda", "--out", str(tmp_path / "runs")], capsys)
        assert code == 2
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "--nproc_per_node=1" in err and "2 ranks" in err and "1 CUDA device" in err
        assert gpus.events == []  # refused before any rank touched a GPU
        assert not (tmp_path / "runs").exists()


# --- memory --------------------------------------------------------------------------------------------------


def test_an_ma_window_whose_ring_fits_but_not_beside_a_step_s_activations_is_refused_before_any_work(
        monkeypatch, capsys, tmp_path):
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", grokfast=True, filter="ma", window=100)
    n = train_module.count_params(cfg)
    # Room for the weights, gradients, AdamW's moments and the ring of 101 copies (all the check used to count),
    # and 32 MiB more: a tiny model's step (16 x 256 tokens) needs several times that.
    room = 16 * n + 101 * 4 * n + 32 * 2**20
    monkeypatch.setattr(train_module, "available_memory", lambda device: room)
    code, _, err = run_main(TINY + ["--grokfast", "--filter", "ma", "--window", "100", "--max-steps", "1",
                                    "--eval-tokens", "257", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("Error: ") and "--window" in err and "activations" in err
    assert not (tmp_path / "runs").exists()
    need = train_module.memory_estimate(cfg, torch.device("cpu"))
    assert need.activations + need.logits > 64 * 2**20


# --- disk ----------------------------------------------------------------------------------------------------


class Usage:
    def __init__(self, free):
        self.total, self.used, self.free = 10 * free, 9 * free, free


def test_checkpoints_that_cannot_fit_on_the_run_s_disk_are_refused_before_any_work(monkeypatch, capsys, tmp_path):
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", grokfast=True, filter="ma", window=100)
    one = 101 * 4 * train_module.count_params(cfg)  # a checkpoint holds at least the ring and its sum
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(2 * one))  # not 2 kept + 1 being written
    code, _, err = run_main(TINY + ["--grokfast", "--filter", "ma", "--window", "100", "--max-steps", "1",
                                    "--eval-tokens", "257", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "--keep-checkpoints 1" in err and "--checkpoint-every 0" in err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_s_checkpoints_are_counted_for_every_run_and_those_already_on_disk_as_free(monkeypatch, tmp_path):
    from hlb_gpt import footprint

    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", grokfast=True, filter="ma", window=20)
    one = footprint.checkpoint_bytes(cfg, train_module.count_params(cfg))
    runs = [tmp_path / f"run{i}" for i in range(3)]
    monkeypatch.setattr(train_module.shutil, "disk_usage", lambda path: Usage(5 * one))
    train_module.check_disk([cfg], runs[:1])  # 2 kept + 1 being written
    with pytest.raises(train_module.ConfigError, match="for each of 3 runs"):
        train_module.check_disk([cfg] * 3, runs)  # 3 x 2 kept + 1
    (runs[0] / "checkpoints").mkdir(parents=True)
    for step in (1, 2):  # a run done already: its files are on the disk the check reads
        (runs[0] / "checkpoints" / f"step-{step:09d}.pt").write_bytes(b"\0" * one)
    train_module.check_disk([cfg] * 3, runs)
    train_module.check_disk([cfg.replace(checkpoint_every=0)] * 3, runs)  # no checkpoints, nothing to fit


def test_the_checkpoint_size_estimate_is_the_written_file_s_size_within_a_few_percent(tmp_path):
    from hlb_gpt import footprint
    from hlb_gpt.checkpoint import latest_checkpoint

    for changes in ({"grokfast": True, "filter": "ma", "window": 30}, {"grokfast": True}, {},
                    {"optimizer": "grokadamw", "lr": 1e-3}):
        cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=2, width=64, seq_len=32,
                        batch_size=4, eval_tokens=64, max_steps=1, data_cache=str(tmp_path / "cache"), **changes)
        run = tmp_path / "-".join(map(str, changes.values()))
        train_module.train(cfg, run, progress=False)
        written = latest_checkpoint(run).stat().st_size
        assert footprint.checkpoint_bytes(cfg, train_module.count_params(cfg)) == pytest.approx(written, rel=0.05)


PEAK_CODE = """
import json, sys
from pathlib import Path
from hlb_gpt.config import RunConfig
from hlb_gpt.device import _high_water_mark, _reset_high_water_mark
from hlb_gpt.train import memory_estimate, train
import torch

tokenizer, depth, width, seq_len, batch, out = json.loads(sys.argv[1])
cfg = RunConfig(dataset="mini", preset="tiny", tokenizer=tokenizer, depth=depth, width=width, seq_len=seq_len,
                batch_size=batch, seq_warmup=False, max_steps=2, eval_tokens=seq_len + 1, eval_at_start=False,
                checkpoint_every=0, data_cache=str(Path(out) / "cache"))
_reset_high_water_mark()
before = _high_water_mark()
summary = train(cfg, Path(out) / "run", progress=False)
print(json.dumps([summary["memory"]["peak_bytes"] - before, memory_estimate(cfg, torch.device("cpu")).total]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("size", [("gpt2", 2, 128, 256, 8), ("bytes", 4, 256, 512, 32)], ids=["logits", "blocks"])
def test_the_memory_estimate_is_within_a_quarter_of_a_cpu_run_s_measured_peak(tmp_path, size):
    """A run whose peak is mostly logits (the gpt2 vocabulary), and one whose peak is mostly the blocks'
    activations; each in a fresh process, so that its resident set before the run is the baseline."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PEAK_CODE, json.dumps([*size, str(tmp_path)])], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    measured, estimated = json.loads(done.stdout.splitlines()[-1])
    assert measured > 2**30  # the run's own allocations dominate its process's baseline
    assert 0.8 < estimated / measured < 1.25
