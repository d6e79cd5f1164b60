"""hlb_gpt.flops: FLOPs per token from the architecture, the GPUs' bf16 peaks, and MFU."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hlb_gpt.flops import flops_per_token, matmul_params, mfu, peak_flops, peak_flops_of, throughput
from hlb_gpt.model import GPT, GPTConfig


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
@pytest.mark.parametrize("seq_len", [8, 16])
def test_flops_per_token_is_what_torch_counts_for_a_training_step(gate, seq_len):
    config = GPTConfig(vocab_size=64, depth=2, width=32, max_seq_len=16, gate=gate)
    model = GPT(config)
    x = torch.randint(0, 64, (3, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    assert counter.get_total_flops() == flops_per_token(config, seq_len) * x.numel()


def test_matmul_params_are_the_model_matrices_but_the_embedding():
    config = GPTConfig(vocab_size=128, depth=3, width=64, gate="relu")
    with torch.device("meta"):
        model = GPT(config)
    assert matmul_params(config) == sum(p.numel() for n, p in model.named_parameters()
                                        if p.ndim == 2 and not n.startswith("embed."))


def test_the_hlb_model_needs_about_six_flops_per_parameter_and_token_plus_attention():
    config = GPTConfig()  # hlb: 8 x 384, 50,304 vocabulary
    per_token = flops_per_token(config, 1024)
    assert 6 * matmul_params(config) < per_token < 6 * matmul_params(config) * 1.5
    # 6 x (8 blocks x 921,600 + head 19,316,736) + 6 x 8 blocks x 1024 x (48 + 384)
    assert per_token == 6 * (8 * 921_600 + 19_316_736) + 6 * 8 * 1024 * (48 + 384)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125), ("NVIDIA L4", 121),
    ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165),
])
def test_known_gpus_have_their_dense_bf16_peak(name, tflops):
    assert peak_flops_of(name) == tflops * 1e12


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA L40", "AMD Instinct"])
def test_unknown_gpus_have_no_peak_rather_than_a_guess(name):
    assert peak_flops_of(name) is None


def test_mfu_is_absent_on_the_cpu_and_read_from_the_gpus_name_on_cuda(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1e6, 3e8, peak_flops(torch.device("cpu"))) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = peak_flops(torch.device("cuda"))
    assert peak == 989e12
    assert mfu(1e6, 3e8, peak) == pytest.approx(3e14 / 989e12)


def test_throughput_gives_flops_per_second_everywhere_and_mfu_only_with_a_peak():
    on_cpu = throughput(tokens=1000, flops=3e11, seconds=2.0, peak=None)
    assert on_cpu == {"tokens_per_s": 500.0, "flops_per_s": 1.5e11, "mfu": None}
    on_h100 = throughput(tokens=1000, flops=3e11, seconds=2.0, peak=peak_flops_of("NVIDIA H100 80GB HBM3"))
    assert on_h100["mfu"] == pytest.approx(1.5e11 / 989e12)


def test_throughput_of_an_interval_without_steady_time_or_a_count_is_unknown():
    assert throughput(tokens=0, flops=0.0, seconds=0.0, peak=312e12) == {
        "tokens_per_s": None, "flops_per_s": None, "mfu": None}
    # FLOPs not counted (a checkpoint written before they were): the rate is unknown, not zero
    unknown = throughput(tokens=1000, flops=math.nan, seconds=2.0, peak=312e12)
    assert unknown == {"tokens_per_s": 500.0, "flops_per_s": None, "mfu": None}
