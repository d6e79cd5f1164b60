"""GPU smoke check: what a first GPU run needs to work, checked in a few minutes, offline, on the bundled `mini`.

    python bench/gpu_check.py              # on one GPU: under 8 minutes; exits 1 if any check fails
    python bench/gpu_check.py --device cpu # the same checks at laptop size (CI runs this)

Each check is a small function returning one row of the table (name, ok, numbers):

    default run       a short run of the default preset (hlb on CUDA, compiled, bf16, its attention) through the
                      sequence warm-up to full length: tokens/s, step time, compile time, peak memory, MFU
    attention T=32    FlexAttention against SDPA on the whole model: the loss and every gradient (position
    attention T=1024  bias included) agree and are finite (CPU: torch's dense flex reference), and the time of
                      one block's attention with each (CPU: forward only, eager)
    filter grid       10 compiled runs (none, EMA, MA settings): every one compiles and completes (CPU: 3 of
                      them, one of each filter; the 10 compiled CPU sweeps are tests/test_compile.py's)
    torchrun refusal  torchrun with more ranks than GPUs is refused in one line naming --nproc_per_node
                      (on a CPU: ranks that pretend to have one GPU, so the refusal's code path runs)

On the CPU the same checks run at `tiny` size with the bytes tokenizer and a few steps; timings there say
nothing about a GPU. A check that cannot apply on this device says "n/a" and does not fail.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hlb_gpt.attention_check import compare_attention
from hlb_gpt.config import RunConfig
from hlb_gpt.device import resolve_device, synchronize
from hlb_gpt.flops import flops_per_token, mfu, peak_flops
from hlb_gpt.model import Block, GPTConfig, gpt_config
from hlb_gpt.sweep import run_folder_name
from hlb_gpt.tasks.lm import BatchSchedule
from hlb_gpt.train import train


@dataclass
class Row:
    """One line of the table: `ok` is True, False (the check failed) or None (n/a on this device)."""

    name: str
    ok: bool | None
    numbers: dict[str, str] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """The sizes of the checks on one device: the real ones on CUDA, small ones elsewhere."""

    device: torch.device
    work: Path
    run: RunConfig  # the default run
    grid_base: RunConfig  # the base of the filter grid (compiled)
    grid: tuple[dict[str, Any], ...] = ()  # the settings of the filter grid, each a change of grid_base
    attention_lengths: tuple[int, ...] = (32, 1024)
    attention_batch: int = 8
    attention_width: int = 384

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


FILTER_GRID: tuple[dict[str, Any], ...] = (
    dict(grokfast=False),
    *(dict(grokfast=True, filter="ema", alpha=a, gain=g) for a in (0.8, 0.9, 0.98) for g in (0.5, 2.0)),
    *(dict(grokfast=True, filter="ma", window=w, gain=2.0) for w in (2, 8, 32)),
)
# On a CPU one setting of each filter: what compiles there is tested by tests/test_compile.py's compiled sweeps.
CPU_FILTER_GRID: tuple[dict[str, Any], ...] = (FILTER_GRID[0], FILTER_GRID[1], FILTER_GRID[-1])


def make_plan(device: torch.device, work: Path) -> Plan:
    """On CUDA: the default (hlb) preset for 420 steps, every length of the sequence warm-up and 20 steps at 1024;
    the grid on `tiny` with the gpt2 tokenizer. Elsewhere: `tiny` with bytes, 4 x 64 tokens, a few steps."""
    common = dict(dataset="mini", data_cache=str(work / "cache"), checkpoint_every=0, device=device.type)
    if device.type == "cuda":
        run = RunConfig(**common, max_steps=420, eval_tokens=16_384)
        grid = RunConfig(**common, preset="tiny", compile=True, max_steps=30, seq_warmup=False, eval_tokens=16_384)
        return Plan(device, work, run, grid, grid=FILTER_GRID)
    small = dict(**common, preset="tiny", tokenizer="bytes", batch_size=4, seq_len=64, eval_tokens=1024)
    run = RunConfig(**small, max_steps=6)
    grid = RunConfig(**small, compile=True, max_steps=3, seq_warmup=False, eval_at_start=False)
    return Plan(device, work, run, grid, grid=CPU_FILTER_GRID, attention_batch=1, attention_width=128)


# ----------------------------------------------------------------------------------------------- the checks


def _quiet_train(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg, run_dir, progress=False)


def mean_flops_per_token(cfg: RunConfig, model: GPTConfig, steps: int) -> float:
    """FLOPs per token averaged over a run's steps: every step has the same tokens, the warm-up shorter lengths."""
    schedule = BatchSchedule(cfg.seq_len, cfg.batch_size, cfg.seq_warmup)
    return sum(flops_per_token(model, schedule.length_at(s)) for s in range(steps)) / steps


def check_default_run(plan: Plan) -> Row:
    cfg = plan.run
    summary = _quiet_train(cfg, plan.work / "default")
    ok = summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])
    ok = ok and (summary["compiled"] or not plan.cuda)  # on CUDA the default compiles: an eager fallback fails
    step_s = summary["step_time_s"]
    numbers = {"steps": f"{summary['steps']}", "compile s": f"{summary['compile_time_s']:.1f}",
               "peak": f"{summary['memory']['peak_bytes'] / 2**30:.2f} GiB",
               "val loss": f"{summary['final_val_loss']:.3f}", "compiled": str(summary["compiled"])}
    if step_s:
        tokens_per_s = cfg.batch_size * cfg.seq_len / step_s  # every step has the same tokens (section 7)
        numbers.update({"step ms": f"{1e3 * step_s:.1f}", "tokens/s": f"{tokens_per_s:,.0f}"})
        model = gpt_config(cfg)
        util = mfu(tokens_per_s, mean_flops_per_token(cfg, model, summary["steps"]), peak_flops(plan.device))
        numbers["MFU"] = "-" if util is None else f"{100 * util:.1f}%"
    else:
        ok = False  # every interval compiled: the run measured nothing steady
    note = "" if summary["error"] is None else summary["error"][:200]
    return Row(f"default run ({cfg.preset}, {cfg.tokenizer})", ok, numbers, note)


def attention_timing(T: int, batch: int, width: int, device: torch.device, grads: bool, compile_: bool,
                     dtype: torch.dtype, iters: int = 5) -> dict[str, float]:
    """ms per call of one block's attention at length T with SDPA and with FlexAttention (forward, and backward
    with `grads`). Their agreement is `compare_attention`'s, on the whole model."""
    gen = torch.Generator().manual_seed(0)
    qk = width // GPTConfig.qk_div
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    inputs = [make(batch, T, qk), make(batch, T, qk), make(batch, T, width)]
    grad_out = make(batch, T, width)
    pos = torch.arange(T, dtype=torch.int32, device=device)
    distance = pos[:, None] - pos[None, :]
    ms = {}
    for kind in ("sdpa", "flex"):
        block = Block(GPTConfig(width=width, attention=kind)).to(device)
        with torch.no_grad():
            block.position_bias.fill_(0.5)
        fn = torch.compile(block.attend, dynamic=False) if compile_ else block.attend
        q, k, v = (t.detach().clone().requires_grad_(grads) for t in inputs)
        def call():
            for t in (q, k, v, block.position_bias):
                t.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), \
                    torch.set_grad_enabled(grads):
                out = fn(q, k, v, distance)
                if grads:
                    out.backward(grad_out)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile": eager on purpose here
            call()  # the compile, if any, and the first call's allocations stay out of the time
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                call()
            synchronize(device)
        ms[f"{kind}_ms"] = 1e3 * (time.perf_counter() - start) / iters
    return ms


def check_attention(plan: Plan, T: int) -> Row:
    cuda = plan.cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    # Relative to the largest SDPA value. bf16 rounds at 2**-8 and the position bias's gradient sums T x T terms
    # rounded differently by the two kernels; the check is for NaN and for a wrong bias, not for the last bits.
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    # Agreement on the whole model, every gradient included (the CPU runs flex's dense reference)...
    model = compare_attention(T, plan.device, precision="bf16" if cuda else "fp32", compiled=cuda,
                              batch=plan.attention_batch, width=plan.attention_width)
    # ...and the speed of one block's attention (forward and backward on CUDA, forward only on the CPU).
    r = attention_timing(T, plan.attention_batch, plan.attention_width, plan.device, grads=cuda, compile_=cuda,
                         dtype=dtype)
    worst_name, worst = model.worst
    loss_rel = model.loss_error / max(abs(model.sdpa_loss), 1e-30)
    finite = not model.nonfinite and math.isfinite(model.flex_loss)
    numbers = {"loss rel": f"{loss_rel:.1e}", "worst grad": f"{worst_name} {worst:.1e}",
               "sdpa ms": f"{r['sdpa_ms']:.2f}", "flex ms": f"{r['flex_ms']:.2f}"}
    note = "" if finite else f"non-finite values{': ' + ', '.join(model.nonfinite) if model.nonfinite else ''}"
    ok = finite and max(loss_rel, worst) <= tolerance
    return Row(f"attention T={T}", ok, numbers, note)


def check_filter_grid(plan: Plan) -> Row:
    failed = []
    for changes in plan.grid:
        cfg = plan.grid_base.replace(**changes)
        name = run_folder_name(cfg)
        summary = _quiet_train(cfg, plan.work / "grid" / name)
        if summary["status"] != "completed" or not summary["compiled"]:
            failed.append(f"{name}: {summary['status']}, {summary['compile_error'] or summary['error']}"[:160])
    numbers = {"runs": f"{len(plan.grid) - len(failed)}/{len(plan.grid)} compiled and completed"}
    return Row("filter grid (compiled)", not failed, numbers, "; ".join(failed))


PRETEND = "--pretend-gpus"


def torchrun_refusal(nproc: int, pretend_gpus: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """torchrun with `nproc` ranks of a one-step run: the hook the refusal check calls (a test may replace it).
    With `pretend_gpus`, each rank runs hlb-gpt in a process that believes it has that many GPUs (this file's
    `--pretend-gpus` mode): on a CPU the refusal's own code path runs, up to the first real CUDA call."""
    hlb = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--max-steps", "1", "--checkpoint-every",
           "0", "--out", tempfile.mkdtemp(prefix="gpu-check-torchrun-")]
    entry = (["-m", "hlb_gpt"] if pretend_gpus is None
             else [str(Path(__file__).resolve()), PRETEND, str(pretend_gpus), "--", "--device", "cuda"])
    return subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={nproc}", *entry, *hlb],
                          capture_output=True, text=True, timeout=timeout)


def check_torchrun_refusal(plan: Plan) -> Row:
    """Every rank says one line naming --nproc_per_node and the GPU count and exits 2, before touching a GPU; no
    traceback of hlb-gpt's (torchrun adds its own report of the failed ranks, which is not ours to quiet)."""
    name = "torchrun refusal"
    if shutil.which("torchrun") is None:
        return Row(name, False, {}, "torchrun is not on PATH")
    gpus = torch.cuda.device_count() if plan.cuda else 1
    nproc = gpus + 1
    done = torchrun_refusal(nproc, pretend_gpus=None if plan.cuda else gpus)
    said = [line for line in done.stderr.splitlines()
            if line.startswith("Error: ") and f"--nproc_per_node={gpus}" in line and f"has {gpus} CUDA" in line]
    ours = [line for line in done.stderr.splitlines() if "hlb_gpt" in line and line.lstrip().startswith("File ")]
    refused = done.returncode != 0 and len(said) == nproc and not ours
    last = [line for line in done.stderr.splitlines() if line.strip()]
    note = "" if refused else f"exit {done.returncode}: {(ours or last or [''])[-1][:200]}"
    where = f"{nproc} on {gpus} GPU(s)" + ("" if plan.cuda else " (pretended on the CPU)")
    return Row(name, refused, {"ranks": where, "ranks refused": f"{len(said)}/{nproc}"}, note)


def checks(plan: Plan) -> list[tuple[str, Callable[[Plan], Row]]]:
    """The checks in the order they run; extend by adding (name, function) pairs."""
    return [
        ("default run", check_default_run),
        *((f"attention T={T}", lambda p, T=T: check_attention(p, T)) for T in plan.attention_lengths),
        ("filter grid (compiled)", check_filter_grid),
        ("torchrun refusal", check_torchrun_refusal),
    ]


# ----------------------------------------------------------------------------------------------- the table


def run_checks(plan: Plan) -> list[Row]:
    """Every check, each in turn; a check that raises is a failed row, and the others still run."""
    rows = []
    for name, check in checks(plan):
        start = time.perf_counter()
        try:
            row = check(plan)
        except Exception as exc:  # one broken check must not hide the others' results
            row = Row(name, False, {}, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300])
        row.numbers.setdefault("check s", f"{time.perf_counter() - start:.0f}")
        rows.append(row)
        print(f"  {row.name}: {_status(row.ok)}", file=sys.stderr, flush=True)
    return rows


def _status(ok: bool | None) -> str:
    return {True: "ok", False: "FAIL", None: "n/a"}[ok]


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  {'result':<6}  numbers"]
    for r in rows:
        numbers = ", ".join(f"{k} {v}" for k, v in r.numbers.items())
        lines.append(f"{r.name:<{width}}  {_status(r.ok):<6}  {numbers}{f'  ({r.note})' if r.note else ''}")
    return "\n".join(lines)


def pretend_gpus(argv: list[str]) -> None:
    """`--pretend-gpus N -- HLB-GPT ARGS`: hlb-gpt in a process that believes it has N CUDA devices."""
    count, sep, *args = argv
    assert sep == "--", "usage: gpu_check.py --pretend-gpus N -- HLB-GPT ARGS"
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: int(count)
    from hlb_gpt.cli import main as hlb_gpt

    hlb_gpt(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PRETEND]:
        pretend_gpus(argv[1:])  # exits
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder [a temporary one]")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # `mini` is bundled: nothing to download
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    plan = make_plan(device, work)
    name = torch.cuda.get_device_name(device) if plan.cuda else f"{torch.get_num_threads()} threads"
    print(f"hlb-gpt GPU check: torch {torch.__version__}, {device} ({name})", flush=True)
    start = time.perf_counter()
    try:
        rows = run_checks(plan)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(rows))
    failed = [r.name for r in rows if r.ok is False]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed or n/a in {time.perf_counter() - start:.0f} s"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
