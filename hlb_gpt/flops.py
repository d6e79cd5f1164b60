"""Model FLOPs utilisation: the FLOPs a training step of the GPT needs, over what the device can do.

FLOPs are counted from the architecture, as the PaLM paper counts them: each multiply-add is 2 FLOPs and a
training step is 3 forward passes' worth (forward, and a backward of twice its cost). Attention counts the whole
T x T score matrix, not the causal half a kernel may skip, so the figure is comparable across kernels and with
other reports. Elementwise work (norms, GELU, softmax, the loss) is left out: it is a few percent. This is what
`torch.utils.flop_counter.FlopCounterMode` counts for one training step on the CPU (tests/test_flops.py).
"""

from __future__ import annotations

import math
import re

import torch

from hlb_gpt.model import GPTConfig

# Dense (no sparsity) bf16 tensor-core peak per GPU, in TFLOP/s, from the vendors' datasheets. The first
# pattern that matches `torch.cuda.get_device_name()` decides; order matters (H100 PCIe before H100).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b", 989.0),  # SXM
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bA10\b", 125.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.0),  # with float32 accumulation, as torch's bf16 matmuls accumulate
    (r"\bRTX 3090\b", 71.0),
)


def matmul_params(config: GPTConfig) -> int:
    """Weights used in a matrix multiply per token: each block's expand, project and gate, and the head. The
    embedding is a lookup, and norms and position biases are elementwise."""
    qk = config.width // config.qk_div
    hidden = config.expand * config.width
    block = (2 * qk + 2 * hidden) * config.width + config.width * hidden
    if config.gate != "none":
        block += config.width * config.width
    return config.depth * block + config.width * config.vocab_size


def attention_flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token of attention at length `seq_len`: scores q.k (qk channels) and the weighted sum
    of values (width channels) over all `seq_len` positions, in every block."""
    qk = config.width // config.qk_div
    return 6 * config.depth * seq_len * (qk + config.width)


def flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Training FLOPs (forward and backward) per token of sequences of length `seq_len`."""
    return 6 * matmul_params(config) + attention_flops_per_token(config, seq_len)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None: a CPU, or a GPU not in `BF16_PEAK_TFLOPS`."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name` (as CUDA names it), in FLOP/s; None if unknown."""
    for pattern, tflops in BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device, in [0, 1] for a plausible measurement; None without a peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


def throughput(tokens: int, flops: float, seconds: float, peak: float | None) -> dict[str, float | None]:
    """Tokens and FLOPs per second over `seconds` of training, and MFU over `peak` (the FLOP/s of every device the
    run trains on together). None where unknown: no time measured, FLOPs not counted (NaN), or no peak."""
    if not seconds > 0:
        return {"tokens_per_s": None, "flops_per_s": None, "mfu": None}
    flops_per_s = flops / seconds if math.isfinite(flops) else None
    utilisation = flops_per_s / peak if flops_per_s is not None and peak else None
    return {"tokens_per_s": tokens / seconds, "flops_per_s": flops_per_s, "mfu": utilisation}
