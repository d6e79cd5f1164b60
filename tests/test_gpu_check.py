"""bench/gpu_check.py: the GPU smoke check, a list of named checks printed as one table, non-zero exit on any
failure; on the CPU the same checks at tiny size (the refusal through ranks that pretend to have a GPU)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_runs import bench_fixture

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


gpu_check = bench_fixture("gpu_check")


def test_a_failing_or_raising_check_fails_the_run_and_the_others_still_run(gpu_check, monkeypatch, capsys):
    def broken(plan):
        raise RuntimeError("Inductor could not compile\nmore detail")

    monkeypatch.setattr(gpu_check, "checks", lambda plan: [
        ("fine", lambda p: gpu_check.Row("fine", True, {"x": "1"})),
        ("broken", broken),
        ("n/a here", lambda p: gpu_check.Row("n/a here", None, {})),
        ("wrong", lambda p: gpu_check.Row("wrong", False, {"rel": "0.5"}, "disagrees")),
    ])
    assert gpu_check.main(["--device", "cpu"]) == 1
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in table[2:6]}
    assert table[1].split()[:3] == ["check", "result", "numbers"]
    assert rows["fine"].split()[1] == "ok" and rows["n/a"].split()[2] == "n/a"
    assert rows["broken"].split()[1] == "FAIL" and "RuntimeError: Inductor could not compile" in rows["broken"]
    assert rows["wrong"].split()[1] == "FAIL" and "(disagrees)" in rows["wrong"]
    assert table[-1].startswith("2/4 checks passed or n/a") and table[-1].endswith("failed: broken, wrong")


def test_only_n_a_and_passing_checks_exit_zero(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "checks", lambda plan: [("a", lambda p: gpu_check.Row("a", True)),
                                                           ("b", lambda p: gpu_check.Row("b", None))])
    assert gpu_check.main(["--device", "cpu"]) == 0


REFUSAL = "Error: torchrun started 3 ranks on this node but it has 2 CUDA devices: use --nproc_per_node=2 or fewer\n"
TORCHRUN_REPORT = "Traceback (most recent call last):\n  File \"/x/torch/distributed/run.py\"\nChildFailedError:\n"


@pytest.mark.parametrize("exit_code, stderr, ok", [
    (1, REFUSAL * 3 + TORCHRUN_REPORT, True),  # every rank refused; torchrun's own report of them is not ours
    (1, REFUSAL * 2 + TORCHRUN_REPORT, False),  # one rank did not say why
    (1, "Traceback (most recent call last):\n  File \"/x/hlb_gpt/distributed.py\", line 9\n"
        "RuntimeError: CUDA error: invalid device ordinal\n" + TORCHRUN_REPORT, False),
    (1, "Error: something else\n" * 3, False),
    (0, REFUSAL * 3, False),
])
def test_on_cuda_the_refusal_check_wants_every_rank_refused_in_one_line_naming_nproc_per_node(
        gpu_check, monkeypatch, tmp_path, exit_code, stderr, ok):
    asked = []

    def torchrun(nproc, pretend_gpus=None, timeout=180):
        asked.append((nproc, pretend_gpus))
        return subprocess.CompletedProcess([], exit_code, "", stderr)

    monkeypatch.setattr(gpu_check, "torchrun_refusal", torchrun)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/torchrun")
    plan = gpu_check.Plan(torch.device("cuda"), tmp_path, run=None, grid_base=None)
    row = gpu_check.check_torchrun_refusal(plan)
    assert asked == [(3, None)] and row.ok is ok


def test_the_attention_check_times_each_kernel_at_the_lengths_checked_and_compares_them_once(gpu_check, monkeypatch,
                                                                                            tmp_path):
    for T in (32, 1024):  # the times of one block's attention, forward only on the CPU
        r = gpu_check.attention_timing(T, batch=1, width=128, device=torch.device("cpu"), grads=False,
                                       compile_=False, dtype=torch.float32, iters=1)
        assert set(r) == {"sdpa_ms", "flex_ms"} and min(r.values()) > 0
    # Their agreement is compare_attention's (on the whole model, every gradient): a disagreement there fails
    # the row, and nothing compares the two kernels a second time.
    import dataclasses

    from hlb_gpt.attention_check import compare_attention

    def off(*args, **kwargs):
        agreement = compare_attention(*args, **kwargs)
        return dataclasses.replace(agreement, flex_loss=1.5 * agreement.sdpa_loss)

    plan = gpu_check.make_plan(torch.device("cpu"), tmp_path)
    monkeypatch.setattr(gpu_check, "attention_timing", lambda *a, **k: {"sdpa_ms": 1.0, "flex_ms": 2.0})
    assert gpu_check.check_attention(plan, 32).ok is True
    monkeypatch.setattr(gpu_check, "compare_attention", off)
    row = gpu_check.check_attention(plan, 32)
    assert row.ok is False and row.numbers["loss rel"] == "5.0e-01" and "out rel" not in row.numbers


def test_the_filter_grid_has_ten_settings_with_distinct_run_folders(gpu_check, tmp_path):
    from hlb_gpt.sweep import run_folder_name

    plan = gpu_check.make_plan(torch.device("cpu"), tmp_path)
    names = {run_folder_name(plan.grid_base.replace(**changes)) for changes in gpu_check.FILTER_GRID}
    assert len(gpu_check.FILTER_GRID) == len(names) == 10 and plan.grid_base.compile is True


def test_on_cuda_the_grid_is_all_ten_settings_and_on_the_cpu_one_of_each_filter(gpu_check, tmp_path):
    assert gpu_check.make_plan(torch.device("cuda"), tmp_path).grid == gpu_check.FILTER_GRID
    cpu = gpu_check.make_plan(torch.device("cpu"), tmp_path).grid
    assert set(map(str, cpu)) <= set(map(str, gpu_check.FILTER_GRID))
    assert sorted(c.get("filter", "none") for c in cpu) == ["ema", "ma", "none"]


@pytest.mark.slow
def test_the_gpu_check_passes_on_the_cpu_and_prints_its_table(tmp_path):
    # Its refusal row is the CPU's: 2 ranks that pretend to have one GPU, both refused.
    out = subprocess.run([sys.executable, str(BENCH), "--device", "cpu"], capture_output=True, text=True,
                         timeout=1800, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:2] == ["check", "result"]
    results = dict(re.split(r"\s{2,}", line)[:2] for line in lines[2:-1])
    assert results == {"default run (tiny, bytes)": "ok", "attention T=32": "ok", "attention T=1024": "ok",
                       "filter grid (compiled)": "ok", "torchrun refusal": "ok"}
    assert "ranks 2 on 1 GPU(s) (pretended on the CPU), ranks refused 2/2" in out.stdout
    assert "3/3 compiled and completed" in out.stdout and "5/5 checks passed or n/a" in lines[-1]
