"""FlexAttention against SDPA on the whole model: the same loss and the same gradient of every parameter, the
learned attention ranges (`position_bias`) included, at one sequence length.

The two kernels compute one function (docs/DESIGN.md, section 2), so a flex model given an SDPA model's weights
must reproduce its loss and gradients. On CUDA this checks the FlexAttention kernels (compiled, as training runs
them); on the CPU, where torch's front end refuses FlexAttention with gradients, it lifts that refusal and runs
torch's dense reference, the same score_mod, block mask and captured-buffer gradient path the CUDA kernels are
generated from. `bench/gpu_check.py` and the tests call `compare_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hlb_gpt.device import autocast_for
from hlb_gpt.model import GPT, GPTConfig


@dataclass(frozen=True)
class KernelAgreement:
    """How far the flex model's loss and gradients are from the SDPA model's, at one length."""

    T: int
    sdpa_loss: float
    flex_loss: float
    grad_errors: dict[str, float]
    """Per parameter: the largest |flex - sdpa| difference of its gradient over the largest |sdpa| entry."""
    nonfinite: tuple[str, ...]
    """Parameters whose flex gradient holds a NaN or an infinity (NaN in `grad_errors` too)."""

    @property
    def loss_error(self) -> float:
        return abs(self.flex_loss - self.sdpa_loss)

    @property
    def worst(self) -> tuple[str, float]:
        """The parameter whose gradient differs most, relatively, and by how much (NaN first)."""
        return max(self.grad_errors.items(), key=lambda kv: (kv[1] != kv[1], kv[1]))


@contextlib.contextmanager
def flex_reference_on_cpu() -> Iterator[None]:
    """Let FlexAttention run with gradients on the CPU, through torch's dense reference implementation."""
    import torch.nn.attention.flex_attention as fa

    validate = fa._validate_device
    fa._validate_device = lambda query, key, value: None
    try:
        yield
    finally:
        fa._validate_device = validate


def compare_attention(T: int, device: torch.device | str = "cpu", *, precision: str = "fp32",
                      compiled: bool = False, batch: int = 2, width: int = 384, depth: int = 2, vocab: int = 512,
                      seed: int = 0) -> KernelAgreement:
    """One forward and backward of an SDPA model and of a flex model with the same weights on the same batch of
    `batch` sequences of length T; `compiled` runs both through torch.compile (CUDA only for flex: its compiled
    CPU kernel has no backward). The blocks get different attention ranges, so that each block's
    `position_bias` gradient is its own."""
    device = torch.device(device)
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab, depth=depth, width=width, max_seq_len=T)
    sdpa = GPT(GPTConfig(**config)).to(device)
    with torch.no_grad():
        for i, block in enumerate(sdpa.blocks):
            block.position_bias.fill_(1.0 - 1.5 * i / max(depth - 1, 1))  # softplus from 1.31 down to 0.2
    flex = GPT(GPTConfig(**config, attention="flex")).to(device)
    flex.load_state_dict(sdpa.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    idx, targets = (torch.randint(0, vocab, (batch, T), generator=g).to(device) for _ in range(2))
    autocast = autocast_for(device, precision)
    losses = []
    with flex_reference_on_cpu() if device.type == "cpu" else contextlib.nullcontext():
        for model in (sdpa, flex):
            run = torch.compile(model) if compiled else model
            with autocast():
                loss = run(idx, targets)
            loss.backward()
            losses.append(loss.item())
    errors, nonfinite = {}, []
    for (name, p), q in zip(sdpa.named_parameters(), flex.parameters()):
        expected, got = p.grad.float(), q.grad.float()
        if not torch.isfinite(got).all():
            nonfinite.append(name)
            errors[name] = float("nan")
            continue
        errors[name] = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    return KernelAgreement(T, losses[0], losses[1], errors, tuple(nonfinite))
