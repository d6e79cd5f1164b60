"""The attention of one block, SDPA with the distance bias as a mask vs FlexAttention: time and peak memory.

    python bench/attention.py                  # on CUDA: the hlb shapes (batch 8, T 1024, qk 48, values 384), bf16
    python bench/attention.py --repeats 9      # more interleaved rounds (the median is shown)
    python bench/attention.py --device cpu     # small fp32 shapes: forward only for flex (no CPU backward in torch)

Each row times `Block.attend` alone, the call the model makes: q, k (B, T, qk) and v (B, T, width) in, gradients
to q, k, v and the block's position bias out (`train`), or the forward under no_grad (`eval`). On CUDA every
variant is compiled (as training compiles the model) and warmed up before timing. `peak MB` is the memory
allocated above the inputs during one call (CUDA only). `max |d|` compares the output with SDPA's and
`grad rel` the gradients (largest difference over the largest SDPA gradient, worst of q, k, v, position bias).

    sdpa        the reference: F.scaled_dot_product_attention with a (T, T) additive mask
    flex        FlexAttention as the model uses it: causal block mask, bias as a score_mod, values in heads <= 128
    flex-1head  FlexAttention with the values in one head as wide as the block (for comparison)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch

from hlb_gpt.device import flex_available, resolve_device, synchronize
from hlb_gpt.model import Block, GPTConfig, flex_distance_attention, value_heads

VARIANTS = ("sdpa", "flex", "flex-1head")


def build(name: str, width: int, qk_div: int, device: torch.device):
    """The block whose position bias the variant reads, and the call it times: (q, k, v) -> (B, T, width)."""
    torch.manual_seed(0)
    block = Block(GPTConfig(width=width, qk_div=qk_div, attention="sdpa" if name == "sdpa" else "flex")).to(device)
    with torch.no_grad():
        block.position_bias.fill_(0.5)  # softplus 0.97: a typical learned range, far from the initial 1.31
    if name == "flex-1head":
        return block, lambda q, k, v, distance: flex_distance_attention(q, k, v, block.position_bias, heads=1)
    return block, block.attend


def measure(name: str, mode: str, inputs: dict, args: argparse.Namespace, device: torch.device,
            compile_: bool) -> dict:
    """Warm up (compiling), then time `args.iters` calls, `args.repeats` times; or the reason it cannot run."""
    block, fn = build(name, args.width, args.qk_div, device)
    if compile_:
        fn = torch.compile(fn, dynamic=False)
    q, k, v, distance, grad_out = (inputs[n] for n in ("q", "k", "v", "distance", "grad_out"))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if inputs["q"].dtype == torch.bfloat16
                else contextlib.nullcontext())

    def call():
        if mode == "train":
            for t in (q, k, v, block.position_bias):
                t.grad = None
            with autocast:
                out = fn(q, k, v, distance)
            out.backward(grad_out)
            return out
        with torch.no_grad(), autocast:  # inputs that need no gradient, as in the model's evaluation
            return fn(q.detach(), k.detach(), v.detach(), distance)

    try:
        for _ in range(args.warmup):
            out = call()
        synchronize(device)
    except Exception as exc:  # e.g. no FlexAttention backward on CPU, or a kernel that does not fit
        return {"error": f"{type(exc).__name__}: {str(exc).split('. ')[0]}"[:100]}
    result = {"out": out.detach().float(), "grads": None, "times": [], "fn": call}
    if mode == "train":
        result["grads"] = [t.grad.detach().float().clone() for t in (q, k, v, block.position_bias)]
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - base
    return result


def time_once(result: dict, iters: int, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        result["fn"]()
    synchronize(device)
    return 1e3 * (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="sequences [CUDA 8, CPU 2]")
    ap.add_argument("--seq-len", type=int, default=None, help="T [CUDA 1024, CPU 256]")
    ap.add_argument("--width", type=int, default=384, help="value width (the block's width) [hlb: 384]")
    ap.add_argument("--qk-div", type=int, default=8, help="queries and keys have width // qk-div channels [8]")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="[CUDA bf16, CPU fp32]")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile each variant [on for CUDA; on CPU flex's compiled kernel is inference-only]")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--modes", default="train,eval", help="train (forward + backward) and/or eval (forward)")
    ap.add_argument("--iters", type=int, default=None, help="calls per timing [CUDA 20, CPU 3]")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timings per row (median shown)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # said in the header line
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (8 if cuda else 2)
    args.seq_len = args.seq_len or (1024 if cuda else 256)
    args.iters = args.iters or (20 if cuda else 3)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    compile_ = cuda if args.compile is None else args.compile
    names = [n for n in args.variants.split(",") if n]
    if unknown := set(names) - set(VARIANTS):
        ap.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    if not flex_available():
        names = [n for n in names if n == "sdpa"]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    B, T, C, D = args.batch, args.seq_len, args.width, args.width // args.qk_div
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    pos = torch.arange(T, dtype=torch.int32, device=device)
    inputs = {"q": make(B, T, D).requires_grad_(), "k": make(B, T, D).requires_grad_(),
              "v": make(B, T, C).requires_grad_(), "distance": pos[:, None] - pos[None, :], "grad_out": make(B, T, C)}
    print(f"torch {torch.__version__}, {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if cuda else f', {torch.get_num_threads()} threads'}, "
          f"{str(dtype).removeprefix('torch.')}, {'compiled' if compile_ else 'eager (flex: the unfused reference)'}; "
          f"batch {B}, T {T}, "
          f"qk {D}, values {C} (flex: {value_heads(C)} value heads)")

    rows = [(n, m) for m in args.modes.split(",") for n in names]
    results = {row: measure(*row, inputs, args, device, compile_) for row in rows}
    # Interleaved rounds, so a busy moment of the machine hits every variant alike.
    for _ in range(args.repeats):
        for row, r in results.items():
            if "error" not in r:
                r["times"].append(time_once(r, args.iters, device))

    print(f"{'variant':<11} {'mode':<5} {'ms':>9} {'min ms':>9} {'peak MB':>8} {'max |d|':>9} {'grad rel':>9}")
    for (name, mode), r in results.items():
        if "error" in r:
            print(f"{name:<11} {mode:<5} n/a: {r['error']}")
            continue
        ref = results.get(("sdpa", mode), {})
        diff = (r["out"] - ref["out"]).abs().max().item() if "out" in ref else float("nan")
        rel = float("nan")
        if r["grads"] is not None and ref.get("grads") is not None:
            rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                      for a, b in zip(r["grads"], ref["grads"]))
        peak = f"{r['peak'] / 2**20:8.1f}" if "peak" in r else f"{'-':>8}"
        num = lambda x: f"{x:9.2e}" if x == x else f"{'-':>9}"  # noqa: E731 (NaN: nothing to compare)
        print(f"{name:<11} {mode:<5} {statistics.median(r['times']):9.3f} {min(r['times']):9.3f} {peak} "
              f"{num(diff)} {num(rel)}", flush=True)


if __name__ == "__main__":
    main()
