"""Time one Grokfast filter step on a 46M-parameter set shaped like the hlb preset.

    python bench/filter.py [--steps 20] [--repeats 5]
    python bench/filter.py --paths [--steps 20] [--repeats 5]


Compares the filters (hlb_gpt.grokfast) against two yardsticks:
  (a) the memory-bandwidth floor, ``torch._foreach_copy_`` of the gradients into a same-size buffer
      (reads N bytes, writes N bytes);
  (b) the per-parameter loop of the published code, which allocates new tensors every step.
Methods of one suite run in interleaved rounds, so machine noise hits them alike; each round times
``steps`` consecutive steps (rounded up to a whole MA re-summation period, so the O(W) re-sum is
included amortised) and the table reports the median over rounds of the per-step mean.
The gradients are restored from a pristine copy before every step, outside the timer.
MA at W=100 needs 101 parameter-sized float32 buffers (18.6 GB for 46M parameters), so the W=10 vs
W=100 comparison runs on the transformer blocks only (7.4M parameters), next to their own copy floor.

``--paths`` times instead, per filter, the three ways one step can run: the per-tensor kernel (the body that
``compile=True`` compiles) run eagerly, the ``torch._foreach_*`` path, and the compiled kernel. One job per
filter (EMA; MA with W=8) on the 7.4M block parameters, one thread, each job pinned with ``taskset`` to a core of
its own (the jobs run at once, as many as there are cores); within a job the three paths run in interleaved
rounds. The table gives each path's time as a multiple of the per-tensor kernel run eagerly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from hlb_gpt.grokfast import EMAFilter, GradFilter, MAFilter

VOCAB, WIDTH, DEPTH = 50304, 384, 8


def hlb_shapes(blocks_only: bool = False) -> list[tuple[int, ...]]:
    """Parameter shapes of the hlb preset: embedding, 8 latent-attention blocks, norm, head."""
    qk = WIDTH // 8
    block = [(WIDTH,), (2 * qk + 2 * 2 * WIDTH, WIDTH), (WIDTH, 2 * WIDTH), ()]
    shapes = block * DEPTH
    return shapes if blocks_only else [(VOCAB, WIDTH)] + shapes + [(WIDTH,), (VOCAB, WIDTH)]


class Workload:
    """Parameters with random gradients, restorable to their pristine values before every step."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
        self.pristine = [torch.randn(s, generator=gen) for s in shapes]
        self.numel = sum(p.numel() for p in self.params)

    def restore(self) -> None:
        for p, g in zip(self.params, self.pristine):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def copy_floor(work: Workload) -> Callable[[], None]:
    buffers = [torch.empty_like(g) for g in work.pristine]

    def step() -> None:
        torch._foreach_copy_(buffers, [p.grad for p in work.params])
    return step


def published_loop(work: Workload, alpha: float, gain: float) -> Callable[[], None]:
    """The common published style: a Python loop over parameters allocating new tensors."""
    ema: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step() -> None:
        for n, p in enumerate(work.params):
            if n not in ema:
                ema[n] = p.grad.detach().clone()
            ema[n] = ema[n] * alpha + p.grad * (1 - alpha)
            p.grad = p.grad + ema[n] * gain
    return step


def filter_step(filt: GradFilter) -> Callable[[], None]:
    """A step as the trainer takes it: with `found_inf` (never set), since its optimizers skip on the device."""
    found_inf = torch.zeros(())
    return lambda: filt.step(found_inf)


def run_suite(work: Workload, methods: dict[str, tuple[Callable[[], None], int]], steps: int,
              repeats: int, warmup: int) -> dict[str, float]:
    """Median over rounds of the mean ms/step; each method's round is a multiple of its period."""
    for name, (step, period) in methods.items():
        for _ in range(max(warmup, period + 2)):  # past MA warm-up, and compiles before timing
            work.restore()
            step()
    rounds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (step, period) in methods.items():
            n = -(-steps // period) * period
            total = 0.0
            for _ in range(n):
                work.restore()
                start = time.perf_counter()
                step()
                total += time.perf_counter() - start
            rounds[name].append(1e3 * total / n)
    return {name: statistics.median(times) for name, times in rounds.items()}


def print_table(title: str, work: Workload, results: dict[str, float], floor: str) -> None:
    gb = 4 * work.numel / 1e9
    print(f"\n{title}: {work.numel / 1e6:.1f}M parameters, {gb:.3f} GB of float32 gradients")
    print(f"{'method':<34}{'ms/step':>10}{'x copy floor':>14}")
    for name, ms in results.items():
        print(f"{name:<34}{ms:>10.1f}{ms / results[floor]:>14.2f}")


Suite = dict[str, Callable[[], tuple[Callable[[], None], int]]]


def ema_suite(work: Workload, compiled: bool, alpha: float, gain: float) -> Suite:
    suite: Suite = {"copy floor (a)": lambda: (copy_floor(work), 1)}
    for compile in [False, True] if compiled else [False]:
        tag = "compiled" if compile else "foreach"
        suite[f"EMA {tag}"] = lambda c=compile: (filter_step(EMAFilter(work.params, alpha, gain, compile=c)), 1)
    suite["EMA published loop (b)"] = lambda: (published_loop(work, alpha, gain), 1)
    return suite


def ma_suite(work: Workload, compile: bool, windows: tuple[int, ...], gain: float) -> Suite:
    tag = "compiled" if compile else "foreach"
    suite: Suite = {"copy floor (a)": lambda: (copy_floor(work), 1)}
    for w in windows:
        suite[f"MA W={w} {tag}"] = lambda w=w: (filter_step(MAFilter(work.params, w, gain, compile=compile)), w)
    return suite


PATHS = ("per-tensor eager", "foreach", "compiled")
PATH_WINDOW = 8


def build_path(kind: str, path: str, params: list[torch.nn.Parameter]) -> tuple[GradFilter, int]:
    """A filter of `kind` that steps by `path`, and its period (the MA re-summation)."""
    options = dict(compile=path == "compiled", foreach=path == "foreach")
    if kind == "ema":
        return EMAFilter(params, 0.98, 2.0, **options), 1
    return MAFilter(params, PATH_WINDOW, 2.0, **options), PATH_WINDOW


def path_job(kind: str, steps: int, repeats: int, warmup: int) -> dict[str, float]:
    """ms/step of each path of one filter, on the block parameters (run inside one pinned process)."""
    work = Workload(hlb_shapes(blocks_only=True), seed=1)
    filters = {path: build_path(kind, path, work.params) for path in PATHS}
    results = run_suite(work, {path: (filter_step(f), period) for path, (f, period) in filters.items()},
                        steps, repeats, warmup)
    if filters["compiled"][0].compile_error:
        raise SystemExit(f"the compiled {kind} filter fell back to eager: {filters['compiled'][0].compile_error}")
    return results


def compare_paths(args: argparse.Namespace) -> None:
    """One pinned, single-threaded job per filter, as many at once as there are cores; then the table."""
    if shutil.which("taskset") is None:
        raise SystemExit("--paths pins each job to a core with taskset (util-linux): install it")
    cores = sorted(os.sched_getaffinity(0))
    kinds, results = ["ema", "ma"], {}
    for start in range(0, len(kinds), len(cores)):
        jobs = {kind: subprocess.Popen(
            ["taskset", "-c", str(core), sys.executable, __file__, "--path-job", kind, "--threads", "1",
             "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup)],
            stdout=subprocess.PIPE, text=True) for kind, core in zip(kinds[start:], cores)}
        for kind, job in jobs.items():
            out, _ = job.communicate()
            if job.returncode != 0:
                raise SystemExit(f"the {kind} job failed (exit {job.returncode})")
            results[kind] = json.loads(out.splitlines()[-1])
    numel = sum(torch.Size(s).numel() for s in hlb_shapes(blocks_only=True))
    print(f"\nhlb preset blocks, {numel / 1e6:.1f}M parameters; one job per filter, one thread, one core each; "
          f"median of {args.repeats} rounds of {args.steps} steps")
    print(f"{'filter':<10}" + "".join(f"{p:>18}" for p in PATHS) + "   (ms/step, and x per-tensor eager)")
    for kind in kinds:
        ms = results[kind]
        label = "EMA" if kind == "ema" else f"MA W={PATH_WINDOW}"
        print(f"{label:<10}" + "".join(f"{ms[p]:>18.1f}" for p in PATHS))
        print(f"{'':<10}" + "".join(f"{ms[p] / ms[PATHS[0]]:>17.2f}x" for p in PATHS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (per method)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd variants")
    parser.add_argument("--paths", action="store_true",
                        help="per filter: the per-tensor kernel run eagerly vs the foreach path vs compiled")
    parser.add_argument("--path-job", choices=["ema", "ma"], help=argparse.SUPPRESS)  # one job of --paths
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.paths:
        return compare_paths(args)
    if args.path_job:
        print(json.dumps(path_job(args.path_job, args.steps, args.repeats, args.warmup)))
        return
    alpha, gain = 0.98, 2.0
    tags = ["foreach"] + ([] if args.no_compile else ["compiled"])

    # Suites run one after another so that at most a few GB of filter state are alive at once.
    hlb = Workload(hlb_shapes())
    results: dict[str, dict[str, float]] = {}
    suites = [("hlb preset, EMA", hlb, ema_suite(hlb, not args.no_compile, alpha, gain))]
    suites += [(f"hlb preset, MA ({tag})", hlb, ma_suite(hlb, tag == "compiled", (10,), gain))
               for tag in tags]
    blocks = Workload(hlb_shapes(blocks_only=True), seed=1)
    suites += [(f"blocks only, MA W=10 vs W=100 ({tag})", blocks,
                ma_suite(blocks, tag == "compiled", (10, 100), gain)) for tag in tags]
    for title, work, suite in suites:
        methods = {name: build() for name, build in suite.items()}
        results[title] = run_suite(work, methods, args.steps, args.repeats, args.warmup)
        del methods
        print_table(title, work, results[title], "copy floor (a)")

    ema = results["hlb preset, EMA"]
    floor = ema["copy floor (a)"]
    best = min(ms for name, ms in ema.items() if name.startswith("EMA") and "(b)" not in name)
    print("\ntargets")
    print(f"  EMA fastest / copy floor       {best / floor:6.2f}  (target <= 1.5)")
    print(f"  published loop / EMA fastest   {ema['EMA published loop (b)'] / best:6.2f}  (target >= 10)")
    for tag in tags:
        ma = results[f"blocks only, MA W=10 vs W=100 ({tag})"]
        print(f"  MA W=100 / W=10 ({tag:<8})    {ma[f'MA W=100 {tag}'] / ma[f'MA W=10 {tag}']:6.2f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
