"""Calibrate the pre-flight memory estimate (`hlb_gpt.footprint`) against measured peaks of short CPU runs.

    python bench/memory.py [--sizes 0,3]

Each size trains 2 steps at full length (no warm-up) in a fresh process, so that the process's resident set
before the run is its baseline; the run's own peak (`PeakMemory`, VmHWM on Linux) minus that baseline is what
the run needed. Prints one row per size: measured, estimated, and their ratio. See docs/DESIGN.md, section 9.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

SIZES = [  # tokenizer, depth, width, seq_len, batch, precision, compile
    ("bytes", 4, 128, 256, 16, "fp32", False),
    ("bytes", 4, 256, 512, 32, "fp32", False),
    ("bytes", 8, 384, 1024, 8, "fp32", False),
    ("gpt2", 2, 128, 256, 8, "fp32", False),
    ("gpt2", 4, 128, 512, 8, "fp32", False),
    ("gpt2", 2, 256, 1024, 4, "fp32", False),
    ("gpt2", 2, 128, 512, 8, "bf16", False),
    ("bytes", 4, 256, 512, 32, "bf16", False),
    ("gpt2", 2, 128, 512, 8, "fp32", True),
    ("gpt2", 2, 128, 512, 8, "bf16", True),
    ("bytes", 4, 256, 512, 32, "fp32", True),
    ("bytes", 4, 256, 512, 32, "bf16", True),
]

ONE = """
import json, sys, torch
from pathlib import Path
from hlb_gpt.config import RunConfig
from hlb_gpt.device import _high_water_mark, _reset_high_water_mark
from hlb_gpt.data import get_tokenizer
from hlb_gpt.footprint import estimate
from hlb_gpt.model import pad_vocab
from hlb_gpt.train import count_params, train
tok, depth, width, seq, batch, precision, compile_, cache, out = json.loads(sys.argv[1])
cfg = RunConfig(dataset="mini", preset="tiny", tokenizer=tok, depth=depth, width=width, seq_len=seq, batch_size=batch,
                precision=precision, compile=compile_, seq_warmup=False, max_steps=2, eval_tokens=seq + 1,
                eval_at_start=False, checkpoint_every=0, data_cache=cache)
if compile_:  # compile once beforehand: the measured run's peak is then training's, not the compiler's
    train(cfg.replace(max_steps=1), Path(out) / "warm", progress=False)
import gc; gc.collect()
_reset_high_water_mark()
base = _high_water_mark()
summary = train(cfg, Path(out) / "run", progress=False)
guess = estimate(cfg, count_params(cfg), pad_vocab(get_tokenizer(tok).n_vocab), precision, compile_)
print(json.dumps({"measured": summary["memory"]["peak_bytes"] - base, "estimate": guess.total, "parts": guess.parts()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help="Only these rows of SIZES, e.g. 0,3 [all].")
    args = parser.parse_args()
    sizes = SIZES if args.sizes is None else [SIZES[int(i)] for i in args.sizes.split(",")]
    print("| tokenizer | depth | width | seq | batch | precision | compiled | measured MiB | estimate MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(sizes):
            where = json.dumps([*size, f"{tmp}/cache", f"{tmp}/{i}"])
            done = subprocess.run([sys.executable, "-c", ONE, where], capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr)
            row = json.loads(done.stdout.splitlines()[-1])
            cells = [*map(str, size), f"{row['measured'] / 2**20:,.0f}", f"{row['estimate'] / 2**20:,.0f}",
                     f"{row['estimate'] / row['measured']:.2f}"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
