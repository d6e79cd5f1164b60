"""Training throughput (tokens/s) of the `tiny` and `hlb` presets on this machine, eager and compiled.

    python bench/throughput.py                 # both presets, eager and compiled
    python bench/throughput.py --steps 20 --preset tiny

Each measurement builds the run's parts exactly as `train()` does, runs warm-up steps (compilation happens
there), then times `--steps` optimizer steps at the full sequence length with one host sync at the end,
as the training loop does between logging points.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from hlb_gpt.config import RunConfig
from hlb_gpt.data import BatchSampler, get_tokenizer, load_tokens
from hlb_gpt.model import GPT, GPTConfig, pad_vocab
from hlb_gpt.device import autocast_for, resolve_device, synchronize
from hlb_gpt.tasks.lm import build_optimizer
from hlb_gpt.train import build_filter, optimizer_step


def measure(cfg: RunConfig, steps: int, warmup: int) -> dict:
    device = resolve_device(cfg.device)
    tok = get_tokenizer(cfg.tokenizer)
    tokens = load_tokens(cfg.dataset, tok, Path(cfg.data_cache))
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=pad_vocab(tok.n_vocab), depth=cfg.depth, width=cfg.width,
                          max_seq_len=cfg.seq_len, gate=cfg.gate)).to(device)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    optimizer, scheduler = build_optimizer(cfg, named, device)
    grad_filter = build_filter(cfg, named, compile=bool(cfg.compile))
    forward = torch.compile(model) if cfg.compile else model
    autocast = autocast_for(device, cfg.precision)
    sampler = BatchSampler(tokens["train"], seed=0, device=device)

    def step():
        x, y = sampler.sample(cfg.batch_size, cfg.seq_len)
        micro = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
        return optimizer_step(forward, micro, params, optimizer, scheduler, grad_filter, cfg.clip, autocast)

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
            "warmup_s": warm, "n_params": model.num_params()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "hlb", "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="timed steps [tiny 30, hlb 3]")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--grokfast", action="store_true", help="also measure with the EMA filter on")
    ap.add_argument("--hlb-batch", type=int, default=4, help="sequences per step for hlb on CPU (preset: 64)")
    ap.add_argument("--tiny-tokenizer", choices=["bytes", "gpt2"], default="bytes")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved measurements per setting (median shown)")
    args = ap.parse_args()
    presets = ["tiny", "hlb"] if args.preset == "both" else [args.preset]
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'preset':<6} {'tokenizer':<9} {'mode':<9} {'filter':<7} {'params':>11} {'batch':>9} "
          f"{'step ms':>9} {'tokens/s':>10} {'warm-up s':>9}")
    settings = []
    for preset in presets:
        extra = (dict(tokenizer=args.tiny_tokenizer) if preset == "tiny"
                 else dict(tokenizer="gpt2", batch_size=args.hlb_batch))
        for compiled in modes:
            for grokfast in ([False, True] if args.grokfast else [False]):
                settings.append(RunConfig(dataset="mini", preset=preset, compile=compiled, grokfast=grokfast, **extra))
    # Interleaved rounds, so a busy moment of the machine hits every setting alike.
    results: list[list[dict]] = [[] for _ in settings]
    for _ in range(args.repeats):
        for cfg, out in zip(settings, results):
            out.append(measure(cfg, args.steps or (30 if cfg.preset == "tiny" else 3), args.warmup))
    for cfg, out in zip(settings, results):
        step_ms = statistics.median(r["step_ms"] for r in out)
        tok_s = cfg.batch_size * cfg.seq_len / (step_ms / 1e3)
        print(f"{cfg.preset:<6} {cfg.tokenizer:<9} {'compiled' if cfg.compile else 'eager':<9} "
              f"{'ema' if cfg.grokfast else '-':<7} {out[0]['n_params']:>11,} {cfg.batch_size:>3}x{cfg.seq_len:<5} "
              f"{step_ms:>9.1f} {tok_s:>10,.0f} {out[0]['warmup_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
