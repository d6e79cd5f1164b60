"""Training time until the validation loss first reaches given targets: AdamW vs Muon, each with and without Grokfast.

    python bench/speedrun.py [--targets 2.0,1.9,1.8] [--repeats 3] [--evals-per-epoch 20] [--max-steps 2000]
    python bench/speedrun.py --only muon,muon+grokfast --muon-lr 0.01 --batch-size 4 --targets 2.4,2.2

Every run is `train()` itself on `mini` (preset tiny, tokenizer bytes unless told), in this one process, with
`--target-loss`: seconds and steps are its summary's `time_to_target_s` and `steps_to_target`, the `time_s` and
step of the first evaluation at or below the target (training time only, evaluation excluded). Compile is
excluded too: runs are eager unless --compile, and with --compile the compile time the run had accrued when it
stopped there (its summary's `compile_time_s`) is subtracted. Steps resolve to one evaluation interval
(--evals-per-epoch).

A run stops at its last target: it trains to the loosest target, then resumes from its checkpoint with the next
one (resume is bit-exact, so the legs train exactly what one run would; a target an earlier evaluation already
reached trains nothing), until every target is reached or --max-steps.

Settings run interleaved: repeat r runs every setting (in an order rotated by r) with seed `--seed + r`, so
machine noise hits them alike; the table reports the median over repeats of seconds and steps. A target some
repeat did not reach within --max-steps shows how many did, e.g. `(1/3)`; the median is over those that did.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from hlb_gpt.config import RunConfig
from hlb_gpt.train import train

GROKFAST = dict(grokfast=True, filter="ema", alpha=0.9, gain=0.1)
SETTINGS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "adamw+grokfast": GROKFAST,
    "muon": dict(optimizer="muon"),
    "muon+grokfast": dict(optimizer="muon", **GROKFAST),
}

# (seconds, step) at which a run first reached a target; None if it did not.
Reached = tuple[float, int] | None


def run_to_targets(cfg: RunConfig, run_dir: Path, targets: list[float], max_steps: int) -> dict[float, Reached]:
    """Train `cfg` with --target-loss at each target, loosest first, resuming from where the last one stopped, until
    it has reached every target (or `max_steps`)."""
    reached: dict[float, Reached] = {t: None for t in targets}
    for target in sorted(set(targets), reverse=True):
        summary = train(cfg.replace(max_steps=max_steps, target_loss=target), run_dir, progress=False, resume=True)
        if summary["steps_to_target"] is None:  # diverged, or --max-steps first: the lower targets are not reached
            break
        reached[target] = (summary["time_to_target_s"] - summary["compile_time_s"], summary["steps_to_target"])
    return reached


def base_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(dataset="mini", preset=args.preset, tokenizer=args.tokenizer, batch_size=args.batch_size,
                     evals_per_epoch=args.evals_per_epoch, eval_tokens=args.eval_tokens, epochs=1e6,
                     checkpoint_every=1e6, keep_checkpoints=1, compile=args.compile, data_cache=args.data_cache)


def setting_config(base: RunConfig, name: str, seed: int, muon_lr: float | None) -> RunConfig:
    settings = dict(SETTINGS[name])
    if settings.get("optimizer") == "muon" and muon_lr is not None:
        settings["muon_lr"] = muon_lr
    return base.replace(seed=seed, **settings)


def cell(results: list[Reached]) -> str:
    done = [r for r in results if r is not None]
    if not done:
        return "-"
    seconds, steps = statistics.median(r[0] for r in done), statistics.median(r[1] for r in done)
    note = f" ({len(done)}/{len(results)})" if len(done) < len(results) else ""
    return f"{seconds:.1f} s / {steps:g} steps{note}"


def table(results: dict[str, list[dict[float, Reached]]], targets: list[float]) -> str:
    lines = ["| setting | " + " | ".join(f"val ≤ {t:g}" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for name, runs in results.items():
        lines.append(f"| {name} | " + " | ".join(cell([run[t] for run in runs]) for t in targets) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=lambda s: [float(v) for v in s.split(",")], default=[2.0, 1.9, 1.8])
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds, with seeds --seed .. --seed + repeats - 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(SETTINGS),
                        help=f"settings to run, of {', '.join(SETTINGS)}")
    parser.add_argument("--muon-lr", type=float, default=None, help="Muon's lr [the --optimizer muon default]")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--batch-size", type=int, default=None, help="[preset]")
    parser.add_argument("--evals-per-epoch", type=int, default=20, help="resolution of the steps to a target")
    parser.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per evaluation [preset]")
    parser.add_argument("--max-steps", type=int, default=2000, help="give up on a target after this many steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time excluded)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    parser.add_argument("--data-cache", default="data")
    parser.add_argument("--out", default=None, help="keep the runs in this folder [a temporary one]")
    args = parser.parse_args()
    unknown = set(args.only) - set(SETTINGS)
    if unknown:
        parser.error(f"--only: unknown settings {', '.join(sorted(unknown))} (of {', '.join(SETTINGS)})")
    if args.threads:
        torch.set_num_threads(args.threads)

    base = base_config(args)
    muon_lr = setting_config(base, "muon", 0, args.muon_lr).muon_lr
    print(f"mini, preset {base.preset} ({base.depth} x {base.width}, batch {base.batch_size} x {base.seq_len}), "
          f"tokenizer {base.tokenizer}, {base.evals_per_epoch} evals/epoch of {base.eval_tokens:,} tokens, "
          f"muon lr {muon_lr:g}, {args.repeats} repeats, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        results: dict[str, list[dict[float, Reached]]] = {name: [] for name in args.only}
        for r in range(args.repeats):
            shift = r % len(args.only)
            for name in args.only[shift:] + args.only[:shift]:
                cfg = setting_config(base, name, args.seed + r, args.muon_lr)
                reached = run_to_targets(cfg, out / f"{name}-s{cfg.seed}", args.targets, args.max_steps)
                results[name].append(reached)
                print(f"  repeat {r} {name}: " + ", ".join(
                    f"{t:g}: " + ("-" if v is None else f"{v[0]:.1f} s / {v[1]} steps") for t, v in reached.items()),
                    flush=True)
    print(table(results, args.targets))


if __name__ == "__main__":
    main()
