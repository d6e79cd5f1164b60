"""Training throughput (tokens/s, MFU) of the `tiny` and `hlb` presets on this machine, eager and compiled.

    python bench/throughput.py                 # both presets, eager and compiled
    python bench/throughput.py --steps 20 --preset tiny

Each measurement builds the run's parts as `train()` does, through the LM task (`build`): the model with the
attention kernel the run would use (flex on CUDA under compile), its precision, optimizer, filter and the
compiled wrapper with its dynamic dimensions. It runs warm-up steps (compilation happens there), then times
`--steps` optimizer steps at the full sequence length with one host sync at the end, as the training loop does
between logging points. On CUDA the hlb preset runs its own batch (64 x 1024); elsewhere `--hlb-batch`. MFU is
the model's FLOPs per token (`hlb_gpt.flops`) over the GPU's dense bf16 peak; "-" on the CPU or an unknown GPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hlb_gpt import distributed
from hlb_gpt.compiling import FallbackCompiled, fresh_start
from hlb_gpt.config import PRESETS, RunConfig
from hlb_gpt.device import autocast_for, resolve_device, synchronize
from hlb_gpt.flops import flops_per_token, mfu, peak_flops
from hlb_gpt.tasks.lm import LanguageModel
from hlb_gpt.train import build_filter, compiles, optimizer_step

CPU_HLB_BATCH = 4  # sequences of 1024 per step for hlb off CUDA: the preset's 64 takes minutes a step on a CPU


def run_config(preset: str, device: torch.device, *, compiled: bool, grokfast: bool = False,
               hlb_batch: int | None = None, tiny_tokenizer: str = "bytes", **changes: Any) -> RunConfig:
    """The run a measurement stands for: the preset on `mini` as `hlb-gpt` trains it. hlb uses the gpt2 tokenizer
    and, on CUDA, the preset's batch; elsewhere `hlb_batch` (default CPU_HLB_BATCH) unless given."""
    extra: dict[str, Any] = dict(tokenizer=tiny_tokenizer)
    if preset == "hlb":
        batch = hlb_batch or (PRESETS["hlb"].batch_size if device.type == "cuda" else CPU_HLB_BATCH)
        extra = dict(tokenizer="gpt2", batch_size=batch)
    return RunConfig(dataset="mini", preset=preset, compile=compiled, grokfast=grokfast, **{**extra, **changes})


@dataclass
class Parts:
    """What one training step needs, built as `train()` builds it."""

    task: LanguageModel
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    grad_filter: Any
    forward: Callable
    autocast: Callable


def build(cfg: RunConfig, device: torch.device) -> Parts:
    """The task, model, optimizer, filter and (compiled) forward of a run of `cfg` on `device`, as `train()` makes
    them: the task chooses the attention kernel and precision, the model is compiled with the task's dynamic
    dimensions."""
    fresh_start()
    compile_model = compiles(cfg, device)
    task = LanguageModel(cfg, device, distributed.Dist(), compile_model)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = task.build_optimizer(named)
    grad_filter = build_filter(cfg, named, compile=compile_model)
    net = FallbackCompiled(model, "the model", dynamic_dims=task.dynamic_dims) if compile_model else model
    return Parts(task, model, [p for _, p in named], optimizer, scheduler, grad_filter,
                 functools.partial(task.loss, net), autocast_for(device, task.precision))


def measure(cfg: RunConfig, steps: int, warmup: int) -> dict:
    device = resolve_device(cfg.device)
    parts = build(cfg, device)

    def step():
        x, y = parts.task.sampler.sample(cfg.batch_size, cfg.seq_len)
        micro = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
        return optimizer_step(parts.forward, micro, parts.params, parts.optimizer, parts.scheduler,
                              parts.grad_filter, cfg.clip, parts.autocast)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        result = step()
    synchronize(device)
    result.loss.item()
    dt = time.perf_counter() - t0
    return {"step_ms": 1e3 * dt / steps, "tokens_per_s": steps * cfg.batch_size * cfg.seq_len / dt,
            "warmup_s": warm, "n_params": parts.model.num_params(), "attention": parts.task.attention,
            "precision": parts.task.precision, "flops_per_token": flops_per_token(parts.model.config, cfg.seq_len),
            "peak_flops": peak_flops(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "hlb", "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="timed steps [tiny 30, hlb 3]")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--grokfast", action="store_true", help="also measure with the EMA filter on")
    ap.add_argument("--hlb-batch", type=int, default=None,
                    help=f"sequences per step for hlb [CUDA: the preset's {PRESETS['hlb'].batch_size}; "
                         f"elsewhere {CPU_HLB_BATCH}]")
    ap.add_argument("--tiny-tokenizer", choices=["bytes", "gpt2"], default="bytes")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved measurements per setting (median shown)")
    args = ap.parse_args()
    device = resolve_device("auto")
    presets = ["tiny", "hlb"] if args.preset == "both" else [args.preset]
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device} ({name})")
    print(f"{'preset':<6} {'tokenizer':<9} {'mode':<9} {'attn':<5} {'prec':<5} {'filter':<7} {'params':>11} "
          f"{'batch':>9} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'warm-up s':>9}")
    settings = []
    for preset in presets:
        for compiled in modes:
            for grokfast in ([False, True] if args.grokfast else [False]):
                settings.append(run_config(preset, device, compiled=compiled, grokfast=grokfast,
                                           hlb_batch=args.hlb_batch, tiny_tokenizer=args.tiny_tokenizer))
    # Interleaved rounds, so a busy moment of the machine hits every setting alike.
    results: list[list[dict]] = [[] for _ in settings]
    for _ in range(args.repeats):
        for cfg, out in zip(settings, results):
            out.append(measure(cfg, args.steps or (30 if cfg.preset == "tiny" else 3), args.warmup))
    for cfg, out in zip(settings, results):
        step_ms = statistics.median(r["step_ms"] for r in out)
        tok_s = cfg.batch_size * cfg.seq_len / (step_ms / 1e3)
        first = out[0]
        util = mfu(tok_s, first["flops_per_token"], first["peak_flops"])
        print(f"{cfg.preset:<6} {cfg.tokenizer:<9} {'compiled' if cfg.compile else 'eager':<9} "
              f"{first['attention']:<5} {first['precision']:<5} {'ema' if cfg.grokfast else '-':<7} "
              f"{first['n_params']:>11,} {cfg.batch_size:>3}x{cfg.seq_len:<5} {step_ms:>9.1f} {tok_s:>10,.0f} "
              f"{'-' if util is None else f'{100 * util:.1f}%':>6} {first['warmup_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
