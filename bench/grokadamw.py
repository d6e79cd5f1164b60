"""Time one optimizer step on the hlb preset's parameters: AdamW (fused, foreach) vs GrokAdamW (foreach, compiled).

    python bench/grokadamw.py [--steps 10] [--repeats 5] [--blocks-only]

The parameters are the hlb preset's model (46M, or its 8 blocks alone with --blocks-only, 7.4M), in the
parameter groups `train()` makes; the gradients are random and shared by every method (no step writes them).
Each step runs as the trainer runs it: ``found_inf`` set (for the optimizers that skip on the device) and
every group's lr changed before each step, as the scheduler does, so a compiled step that recompiled on lr
would show it. Methods run in interleaved rounds, so machine noise hits them alike; the table reports the
median over rounds of the mean ms/step, and the passes over parameter-sized float32 memory that each path
makes per step (reads + writes, counted from its kernels: see `PASSES`). On a GPU the step is bound by
that traffic; on a CPU, with its caches and per-op thread start-up, the time need not follow it.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from hlb_gpt.config import RunConfig
from hlb_gpt.model import GPT, gpt_config
from hlb_gpt.optim import GrokAdamW, param_groups

# Reads + writes of parameter-sized tensors per step, per element.
PASSES = {
    # reads p, g, m, v; writes p, m, v
    "AdamW fused": 7,
    # decay p (2), lerp m (3), scale v (2), addcmul v (3), sqrt/div/add for the denominator (6), addcdiv p (4)
    "AdamW foreach": 22,
    # select g (2), scale+add mu (5), g_hat (3), mask g_hat (2), decay p (2), m (5), v (5),
    # denominator (8), addcdiv p (4): see optim._foreach_update
    "GrokAdamW foreach": 36,
    # one fused pass: reads p, g, mu, m, v; writes p, mu, m, v
    "GrokAdamW compiled": 9,
    # optim._fused_update run eagerly, one op at a time: mu (7), g_hat (5), m (7), v (10), denominator (8),
    # p (8), the four skip selections (12), the four copies back (8)
    "GrokAdamW per-tensor": 65,
}


def hlb_parameters(blocks_only: bool) -> list[tuple[str, nn.Parameter]]:
    cfg = RunConfig(preset="hlb")
    model = GPT(gpt_config(cfg))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if n.startswith("blocks.")] if blocks_only else named


def make_method(name: str, named: list[tuple[str, nn.Parameter]], grads: list[torch.Tensor]) -> Callable[[], None]:
    """A fresh copy of the parameters and the optimizer `name`; returns one step (lr change included)."""
    copies = [(n, nn.Parameter(p.detach().clone())) for n, p in named]
    for (_, p), g in zip(copies, grads):
        p.grad = g
    groups = param_groups(copies, lr=2.5e-3, weight_decay=0.01)
    if name == "AdamW fused":
        opt = torch.optim.AdamW(groups, fused=True)
    elif name == "AdamW foreach":
        opt = torch.optim.AdamW(groups, foreach=True)
    else:
        opt = GrokAdamW(groups, alpha_init=0.98, lamb=2.0, compile=name.endswith("compiled"),
                        foreach=not name.endswith("per-tensor"))
    if name != "AdamW foreach":  # the trainer sets it for every optimizer that skips on the device
        opt.found_inf = torch.zeros(())

    def step() -> None:
        for group in opt.param_groups:
            group["lr"] *= 0.9999
        opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def run_suite(methods: dict[str, Callable[[], None]], steps: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median over interleaved rounds of the mean ms/step."""
    for step in methods.values():
        for _ in range(warmup):  # state allocation, and compilation
            step()
    rounds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, step in methods.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rounds[name].append(1e3 * (time.perf_counter() - start) / steps)
    return {name: statistics.median(times) for name, times in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (per method)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--blocks-only", action="store_true", help="the 8 blocks only (7.4M parameters)")
    parser.add_argument("--no-compile", action="store_true", help="skip GrokAdamW compiled")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    named = hlb_parameters(args.blocks_only)
    grads = [torch.randn_like(p) for _, p in named]
    numel = sum(p.numel() for _, p in named)
    names = [n for n in PASSES if not (args.no_compile and n.endswith("compiled"))]
    methods = {name: make_method(name, named, grads) for name in names}
    del named
    compile_start = time.perf_counter()
    results = run_suite(methods, args.steps, args.repeats, args.warmup)
    if any(not methods[n].optimizer.compile for n in methods if n.endswith("compiled")):
        raise SystemExit("the compiled GrokAdamW step fell back to eager: see the warning above")

    mb = 4 * numel / 2**20
    print(f"\n{'hlb blocks' if args.blocks_only else 'hlb preset'}: {numel / 1e6:.1f}M parameters, "
          f"{mb:.0f} MB per float32 copy; {torch.get_num_threads()} threads; "
          f"{args.repeats} rounds of {args.steps} steps (setup and warm-up {time.perf_counter() - compile_start:.0f} s "
          "before the rounds, compilation included)")
    print(f"{'method':<22}{'ms/step':>10}{'x fused':>10}{'passes':>8}{'x fused':>9}{'GB/s':>8}")
    fused, fused_passes = results["AdamW fused"], PASSES["AdamW fused"]
    for name, ms in results.items():
        gbps = PASSES[name] * 4 * numel / (ms / 1e3) / 1e9
        print(f"{name:<22}{ms:>10.1f}{ms / fused:>10.2f}{PASSES[name]:>8}{PASSES[name] / fused_passes:>9.2f}"
              f"{gbps:>8.1f}")


if __name__ == "__main__":
    main()
