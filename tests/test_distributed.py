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
