"""Rank 0 decides: what it reads from its disk, or the error it hits, reaches every rank."""

import os
import socket
import subprocess
import sys

import pytest

RANK_CODE = """
import os
import torch.distributed as dist
from hlb_gpt import distributed

ctx = distributed.from_env()
dist.init_process_group("gloo")
disk = {"0": "completed", "1": "no such run"}[os.environ["RANK"]]  # as on nodes without a shared filesystem
print("decision:", distributed.on_rank0(lambda: disk, ctx))

def unreadable():
    raise ValueError(f"rank {ctx.rank} cannot read its disk")

try:
    distributed.on_rank0(unreadable, ctx)
except ValueError as exc:
    print("raised:", exc)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_rank_gets_rank_0_s_decision_and_rank_0_s_error():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_CODE], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in ranks]
    for p, (out, err) in zip(ranks, outputs):
        assert p.returncode == 0, err
        assert out.splitlines() == ["decision: completed", "raised: rank 0 cannot read its disk"]


SMALL = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--depth", "1", "--width", "32",
         "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "1024", "--evals-per-epoch", "2000", "-q",
         "--data-cache", "cache", "--out", "sweep"]


def hlb(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "hlb_gpt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_ranks_on_nodes_without_a_shared_filesystem_follow_rank_0_s_disk(tmp_path):
    from hlb_gpt.records import read_run

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    node0, node1, reference = (tmp_path / n for n in ("node0", "node1", "reference"))
    for folder in (node0, node1, reference):
        folder.mkdir()
    # On node 0 only: seed 0 already done, seed 1 done to half the length (so it resumes from its checkpoint).
    assert hlb(SMALL + ["--seed", "0,1", "--epochs", "0.002"], node0, env).returncode == 0
    assert hlb(SMALL + ["--seed", "0", "--epochs", "0.004"], node0, env).returncode == 0
    assert hlb(SMALL + ["--seed", "1", "--epochs", "0.004"], reference, env).returncode == 0
    done_before = read_run(node0 / "sweep" / "baseline-s0").summary

    ddp_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "hlb_gpt", *SMALL, "--seed", "0,1", "--epochs", "0.004"]
    ranks = [subprocess.Popen(command, cwd=node, env={**ddp_env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, node in enumerate((node0, node1))]
    outputs = [p.communicate(timeout=600) for p in ranks]
    for p, (_, err) in zip(ranks, outputs):
        assert p.returncode == 0, err
    assert "baseline-s0: completed already, skipped" in outputs[0][1]
    assert "baseline-s1" in outputs[0][1] and "resumed at step" in outputs[0][1]
    assert read_run(node0 / "sweep" / "baseline-s0").summary == done_before
    resumed = read_run(node0 / "sweep" / "baseline-s1")
    assert resumed.config["world_size"] == 2 and resumed.status == "completed"
    direct = read_run(reference / "sweep" / "baseline-s1").metrics
    assert [r["step"] for r in resumed.metrics] == [r["step"] for r in direct]
    for a, b in zip(direct, resumed.metrics):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert not (node1 / "sweep").exists() or not any((node1 / "sweep").iterdir())  # rank 1 writes nothing
