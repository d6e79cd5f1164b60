"""Data parallelism: how the model is wrapped, leaving the process group, and a failing rank under torchrun."""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hlb_gpt import distributed
from hlb_gpt.model import GPT, GPTConfig

FAILING_RANK = Path(__file__).with_name("failing_rank.py")


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank, in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ddp_keeps_gradients_in_its_buckets_and_does_not_resend_the_constant_buffer(one_rank_group):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, depth=2, width=32, max_seq_len=16))
    wrapped = distributed.wrap(model, torch.device("cpu"))
    assert not wrapped.broadcast_buffers and not wrapped.will_sync_module_buffers()
    idx = torch.randint(0, 64, (2, 16))
    wrapped(idx, idx).backward()
    grads = [p.grad for p in model.parameters()]
    # Views into a few flat buckets, not one tensor per parameter.
    assert len({g.untyped_storage().data_ptr() for g in grads}) < len(grads)


def test_leaving_the_process_group_is_safe_to_repeat(one_rank_group):
    assert dist.is_initialized()
    distributed.shutdown()
    assert not dist.is_initialized()
    distributed.shutdown()  # nothing joined: nothing to do


def test_the_command_line_leaves_the_process_group_when_it_exits_under_torchrun(one_rank_group, monkeypatch):
    from hlb_gpt.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the group itself is the fixture's
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert not dist.is_initialized()


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_a_failed_run_ends_the_sweep_and_only_rank_0_records_it(tmp_path, monkeypatch, rank):
    from hlb_gpt.config import RunConfig
    from hlb_gpt.records import read_run
    from hlb_gpt.sweep import run_sweep

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    started = []

    def broken(cfg, run_dir, **kwargs):
        started.append(cfg.seed)
        raise RuntimeError("out of memory")

    configs = [RunConfig(dataset="mini", seed=seed) for seed in (0, 1)]
    with pytest.raises(RuntimeError, match="out of memory"):
        run_sweep(configs, tmp_path, train_fn=broken, progress=False)
    assert started == [0]  # the other ranks are not left waiting while this one starts the next run
    recorded = read_run(tmp_path / "baseline-s0").summary if (tmp_path / "baseline-s0").exists() else None
    assert (recorded or {}).get("status") == ("failed" if rank == 0 else None)


@pytest.mark.slow
@pytest.mark.parametrize("rank, where", [(1, "step"), (0, "eval")])
def test_a_failing_rank_ends_every_rank_promptly_and_the_run_is_recorded_failed_once(tmp_path, rank, where):
    """Rank 1 failing mid-step (rank 0 then waits in the gradient all-reduce), or rank 0 running out of memory in
    its evaluation (rank 1 waits for its decision): both processes end within seconds, not at the process group's
    timeout (30 minutes for gloo), and the sweep's second run never starts."""
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun is not on PATH")
    args = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--depth", "1", "--width", "32",
            "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "1024", "--max-steps", "6", "--seed", "0,1",
            "-q", "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    job = subprocess.Popen(["torchrun", "--standalone", "--nproc_per_node=2", str(FAILING_RANK), str(rank), where,
                            "--", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = job.communicate(timeout=180)  # start-up included; a hang would last the gloo timeout
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job still ran after {time.monotonic() - started:.0f} s: a rank hangs")
    ended = time.time()
    assert job.returncode != 0
    failed_at = float(re.search(r"injected.* at (\d+\.\d+)", err).group(1))
    assert ended - failed_at < 60, f"the job took {ended - failed_at:.0f} s to end after the failure"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["baseline-s0"]  # the sweep's second run: never
    summary = json.loads((tmp_path / "runs" / "baseline-s0" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["steps"] >= 1  # rank 0's record of the run, not a stub another rank wrote over it
    if rank == 0:  # its own error; rank 1's failure reaches rank 0 as a lost connection
        assert summary["error"].startswith("OutOfMemoryError: injected")
