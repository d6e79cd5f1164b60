"""bench/throughput.py measures what training runs: the model as the LM task builds it, the preset's batch on CUDA,
and MFU where the GPU's peak is known."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlb_gpt import device as device_module
from hlb_gpt.distributed import Dist
from hlb_gpt.config import PRESETS
from hlb_gpt.tasks import lm
from tiny_runs import bench_fixture

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


bench = bench_fixture("throughput")


def test_hlb_is_measured_at_the_presets_batch_on_cuda_and_a_small_one_elsewhere(bench):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert bench.run_config("hlb", cuda, compiled=True).batch_size == PRESETS["hlb"].batch_size == 64
    assert bench.run_config("hlb", cpu, compiled=False).batch_size == bench.CPU_HLB_BATCH
    assert bench.run_config("hlb", cuda, compiled=True, hlb_batch=8).batch_size == 8
    assert bench.run_config("tiny", cuda, compiled=True).batch_size == PRESETS["tiny"].batch_size


def test_the_bench_builds_the_model_with_the_attention_the_task_chooses_on_cuda(bench, monkeypatch, tmp_path):
    # The task's own choice, as on a CUDA device under compile: flex (the model is built, never run, on the CPU).
    real = device_module.attention_for
    monkeypatch.setattr(lm, "attention_for", lambda choice, device, compiled, qk: real(
        choice, torch.device("cuda"), compiled, qk))
    cfg = bench.run_config("tiny", torch.device("cpu"), compiled=True, data_cache=str(tmp_path / "cache"))
    parts = bench.build(cfg, torch.device("cpu"))
    assert parts.task.attention == "flex"
    assert [block.flex for block in parts.model.blocks] == [True] * cfg.depth
    task = lm.LanguageModel(cfg, torch.device("cpu"), Dist(), True)
    torch.manual_seed(cfg.seed)
    trained = task.build_model()
    assert trained.config == parts.model.config
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), parts.model.state_dict().values()))


@pytest.mark.slow
def test_the_bench_prints_its_table_on_cpu_without_an_mfu(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--preset", "tiny", "--compile", "eager", "--steps", "1",
                          "--warmup", "1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[1:3]
    assert header.split()[:5] == ["preset", "tokenizer", "mode", "attn", "prec"] and "MFU" in header
    cells = row.split()
    assert cells[:5] == ["tiny", "bytes", "eager", "sdpa", "fp32"]
    assert header.split()[-3:] == ["MFU", "warm-up", "s"] and cells[-2] == "-"  # no peak to divide by on a CPU
