"""The device module: a run's peak memory is measured from the run's start, on CUDA (mocked) and on the CPU."""

import resource
from pathlib import Path

import pytest
import torch

from hlb_gpt import device as dev
from hlb_gpt.config import RunConfig
from hlb_gpt.device import PeakMemory
from hlb_gpt.sweep import expand_grid, run_sweep

MB = 2**20


def _touch(n_bytes: int) -> torch.Tensor:
    return torch.ones(n_bytes // 4)  # written, so every page is resident


def test_on_linux_a_run_s_peak_ignores_what_the_process_held_before_the_run_started():
    big = _touch(300 * MB)
    before = dev._high_water_mark()
    del big  # a large block goes back to the kernel at once (it is mmapped, not kept by malloc)
    peak = PeakMemory.start(torch.device("cpu"))
    assert peak.kind == "vm_hwm_since_run_start"
    assert peak.read() < before - 200 * MB
    start = peak.read()
    held = _touch(100 * MB)
    assert peak.read() >= start + 90 * MB
    del held


def test_where_the_kernel_cannot_reset_the_peak_it_is_the_process_peak_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(dev, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    peak = PeakMemory.start(torch.device("cpu"))
    assert peak.kind == "process_peak_rss"
    assert peak.read() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_on_cuda_the_run_s_device_peak_statistics_are_reset_then_read(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("read", device)) or 1234)
    cuda1 = torch.device("cuda", 1)
    peak = PeakMemory.start(cuda1)
    assert peak.kind == "cuda_max_memory_allocated" and peak.read() == 1234
    assert calls == [("reset", cuda1), ("read", cuda1)]


@pytest.mark.slow
def test_in_a_width_sweep_the_small_run_after_the_large_one_records_a_smaller_peak(tmp_path):
    base = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, seq_len=128, max_steps=1,
                     eval_tokens=1024, data_cache=str(tmp_path / "cache"))
    configs = expand_grid(base, {"width": [1024, 32]}, grokfast=False, baseline=False)
    large, small = (r.summary["memory"] for r in run_sweep(configs, tmp_path / "sweep", vary=["width"],
                                                            progress=False))
    assert large["peak_kind"] == small["peak_kind"] == "vm_hwm_since_run_start"
    # The large run's training state alone exceeds the gap, so a process-lifetime peak could not pass this.
    assert small["peak_bytes"] < large["peak_bytes"] - large["training_state_bytes"] / 2, (small, large)


# -- the precision --precision auto picks ------------------------------------------------------------------------
@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_on_a_cuda_device_with_native_bf16(monkeypatch, caplog, native, expected):
    # Triton rejects bf16 on pre-Ampere cards, whose bf16 torch only emulates: auto must not count emulation.
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    dev._say_no_native_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="hlb_gpt.device"):
        got = [dev.resolve_precision(torch.device("cuda"), "auto") for _ in range(3)]
    assert got == [expected] * 3 and asked and set(asked) == {False}
    lines = [r.message for r in caplog.records]
    # One line in a process, however many runs of a sweep resolve it, naming the device and the way out.
    assert lines == ([] if native else [
        "Tesla V100-SXM2-16GB has no native bf16: --precision auto trains in fp32 (--precision bf16 forces it)"])


def test_an_asked_precision_is_kept_and_auto_is_fp32_off_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert dev.resolve_precision(torch.device("cuda"), "bf16") == "bf16"
    assert dev.resolve_precision(torch.device("cpu"), "auto") == "fp32"
    assert dev.resolve_precision(torch.device("cpu"), "bf16") == "bf16"


def _resident_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024


def test_heap_an_earlier_run_freed_is_handed_back_before_a_run_s_peak_is_reset():
    # glibc keeps freed heap pages resident; a run's high-water mark, reset to the resident set, would count them.
    if dev._malloc_trim() is None or not Path("/proc/self/status").exists():
        pytest.fail("this test needs Linux with glibc, as the reference machine has")
    blocks = [bytes(range(256)) * 390 for _ in range(2_000)]  # ~200 MB of 100 KB blocks: heap, not mmap
    pin = bytes(range(256)) * 390  # above them, so the heap cannot shrink from its top by itself
    del blocks
    before = _resident_mb()
    dev._return_freed_heap()
    assert before - _resident_mb() > 100, (before, _resident_mb())
    del pin
