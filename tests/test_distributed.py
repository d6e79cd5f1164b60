"""Data parallelism: how the model is wrapped, leaving the process group, a failing rank under torchrun, and rank 0
deciding for every rank."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hlb_gpt import distributed
from hlb_gpt.model import GPT, GPTConfig

FAILING_RANK = Path(__file__).with_name("failing_rank.py")
GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"  # its --pretend-gpus mode


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

    from hlb_gpt.sweep import Decision

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    # No process group here: rank 0 keeps its own decisions, rank 1 receives what rank 0 sends (folders fine,
    # then "train the first run"), as a real group would deliver them.
    sent = iter([({}, None), (Decision("train"), None)])
    monkeypatch.setattr(distributed, "init", lambda ctx, device: device)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, ctx: obj if ctx.is_main else next(sent))
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
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert runs == ["baseline-s0"]  # the sweep's second run: never
    summary = json.loads((tmp_path / "runs" / "baseline-s0" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["steps"] >= 1  # rank 0's record of the run, not a stub another rank wrote over it
    if rank == 0:  # its own error; rank 1's failure reaches rank 0 as a lost connection
        assert summary["error"].startswith("OutOfMemoryError: injected")


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


def two_ranks(code: str) -> list[tuple[int, str, str]]:
    """`code` run by two gloo ranks on this machine: each rank's exit code, stdout and stderr."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in ranks]
    return [(p.returncode, out, err) for p, (out, err) in zip(ranks, outputs)]


@pytest.mark.slow
def test_every_rank_gets_rank_0_s_decision_and_rank_0_s_error():
    for code, out, err in two_ranks(RANK_CODE):
        assert code == 0, err
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


# --- rank 0 of two, without a process group --------------------------------------------------------------------


class FakeDDP(torch.nn.Module):
    """DDP's interface around a model, without its collectives."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args):
        return self.module(*args)

    def no_sync(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.fixture
def rank_0_of_two(monkeypatch):
    """This process as rank 0 of two: every collective returns what it would with an identical second rank."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "init", lambda ctx, device: device)
    monkeypatch.setattr(distributed, "wrap", lambda model, device: FakeDDP(model))
    monkeypatch.setattr(distributed, "mean", lambda t, ctx: t)
    monkeypatch.setattr(distributed, "gather_floats", lambda value, ctx, device: [value, value])
    monkeypatch.setattr(distributed, "broadcast_flag", lambda flag, ctx, device: flag)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, ctx: obj)
    monkeypatch.setattr(distributed, "all_true", lambda flag, ctx, device: flag, raising=False)


def test_under_ddp_rank_0_evaluates_through_a_compiled_wrapper_of_the_bare_model(tmp_path, monkeypatch, rank_0_of_two):
    import hlb_gpt.tasks.lm as lm
    from hlb_gpt import compiling
    from hlb_gpt.config import RunConfig
    from hlb_gpt.train import train

    monkeypatch.setattr(compiling, "BACKEND", "eager")  # dynamo's wrapper, without a C++ compiler's minutes
    evaluated_with, real_evaluate = [], lm.evaluate

    def recording_evaluate(forward, *args):
        evaluated_with.append(forward)
        return real_evaluate(forward, *args)

    monkeypatch.setattr(lm, "evaluate", recording_evaluate)
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                    eval_tokens=64, max_steps=2, compile=True, checkpoint_every=0, data_cache=str(tmp_path / "cache"))
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["compiled"]
    assert len(evaluated_with) == 2  # at step 0 and at the end
    for forward in evaluated_with:
        assert isinstance(forward, compiling.FallbackCompiled)
        assert isinstance(forward.fn, GPT)  # the bare model: not DDP's collective forward


def ma_filter_with_a_large_ring():
    from hlb_gpt.grokfast import MAFilter

    weight = torch.nn.Parameter(torch.zeros(2**20))
    grad_filter = MAFilter([("w", weight)], window=64, gain=1.0)
    weight.grad = torch.randn(2**20)
    grad_filter.step()  # the ring: 64 x 2**20 float32, 256 MiB
    grad_filter.state[weight]["ring"].normal_()  # resident, as after 64 steps
    return grad_filter


def test_the_ddp_filter_checksum_needs_no_float64_copy_of_the_filter_state():
    import ctypes

    from hlb_gpt.device import PeakMemory
    from hlb_gpt.train import filter_checksum

    # Buffers above 1 MiB mapped and unmapped at once: glibc would otherwise keep freed ones in its heap, and the
    # resident set would measure the allocator's fragmentation rather than what the checksum holds at a time.
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 2**20) == 1  # M_MMAP_THRESHOLD
    grad_filter = ma_filter_with_a_large_ring()
    peak = PeakMemory.start(torch.device("cpu"))
    assert peak.kind == "vm_hwm_since_run_start"  # Linux: the peak since the reset, not the process's
    before = peak.read()
    checksum = filter_checksum(grad_filter)
    assert peak.read() - before < grad_filter.nbytes / 2  # a float64 copy of the ring alone: twice its size
    state = grad_filter.state_dict()["state"]["w"]
    expected = sum(t.double().abs().sum() + t.double().sum() for t in (state["ring"], state["sum"])).item()
    assert checksum == pytest.approx(expected, rel=1e-12)


def test_the_ddp_filter_checksum_reads_the_device_once(monkeypatch):
    from hlb_gpt.train import filter_checksum

    grad_filter = ma_filter_with_a_large_ring()
    reads, real_item = [], torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    filter_checksum(grad_filter)
    assert len(reads) == 1


def small_ma_run(tmp_path, **changes):
    from hlb_gpt.config import RunConfig

    return RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=4,
                     eval_tokens=64, grokfast=True, filter="ma", window=50, data_cache=str(tmp_path / "cache"),
                     **changes)


@pytest.mark.parametrize("rank", [0, 1])
def test_on_resume_under_ddp_ranks_that_share_the_file_load_it_themselves(tmp_path, monkeypatch, rank_0_of_two, rank):
    """Rank 0 names the checkpoint (a few hundred bytes, never the state pickled whole: an MA ring makes it tens of
    GB); a rank that sees the same file loads it."""
    import pickle

    from hlb_gpt import train as train_module
    from hlb_gpt.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    train_module.train(small_ma_run(tmp_path, max_steps=2), run, progress=False)
    checkpoint = latest_checkpoint(run)
    assert checkpoint.stat().st_size > 500_000  # the ring: 50 copies of the parameters
    sent, loaded, real_load = [], [], train_module.load_checkpoint
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    if rank == 1:  # what rank 0 sends, as rank 1 receives it: the file it found
        from hlb_gpt.checkpoint import FileStamp

        from_rank_0 = (FileStamp.of(checkpoint), None)
    monkeypatch.setattr(distributed, "broadcast_object",
                        lambda obj, ctx: sent.append(len(pickle.dumps(obj))) or (obj if rank == 0 else from_rank_0))
    monkeypatch.setattr(distributed, "broadcast_flag", lambda flag, ctx, device: False)  # rank 0's: finite, go on
    monkeypatch.setattr(train_module, "load_checkpoint", lambda path: loaded.append(path) or real_load(path))
    monkeypatch.setattr(distributed, "broadcast_tensors", lambda *args: pytest.fail("the state was sent"),
                        raising=False)
    summary = train_module.train(small_ma_run(tmp_path, max_steps=3), run, progress=False, resume=True)
    assert summary["steps"] == 3
    assert loaded == [checkpoint]  # each rank reads it once, itself
    assert sent and max(sent) < 2_000


@pytest.mark.slow
def test_torchrun_with_more_ranks_than_gpus_is_refused_in_one_line_not_a_traceback(tmp_path):
    """Two ranks on a node that (pretends it) has one GPU. torchrun itself then reports the failed ranks in its own
    words; what the ranks print is the one line, and no rank reaches a GPU call."""
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun is not on PATH")
    args = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--device", "cuda",
            "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs")]
    job = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", str(GPU_CHECK), "--pretend-gpus", "1", "--",
                          *args],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert job.returncode != 0
    refusal = "Error: torchrun started 2 ranks on this node but it has 1 CUDA device: use --nproc_per_node=1 or fewer"
    assert refusal in job.stderr.splitlines()
    assert "hlb_gpt" not in job.stderr.replace(str(GPU_CHECK), "")  # no frame of ours in any traceback
    assert not (tmp_path / "runs").exists()


TENSORS_CODE = """
import torch
import torch.distributed as dist
from hlb_gpt import distributed

ctx = distributed.from_env()
dist.init_process_group("gloo")
state = {"w": torch.arange(6.0).reshape(2, 3).t(), "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
         "step": torch.tensor(7), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
         "nested": [{"x": torch.ones(3, dtype=torch.float64)}, ("plain", 3, None)], "lr": 0.1}

def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b

got = distributed.broadcast_tensors(state if ctx.is_main else None, ctx, torch.device("cpu"))
print("same" if same(state, got) else f"differs: {got}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_state_sent_a_tensor_at_a_time_arrives_whole_with_every_dtype_and_shape():
    for code, out, err in two_ranks(TENSORS_CODE):
        assert code == 0, err
        assert out.splitlines() == ["same"]
