"""`hlb-gpt` under torchrun with one rank made to fail, for the tests of a failing rank (not collected by pytest).

    torchrun --standalone --nproc_per_node=2 tests/failing_rank.py RANK WHERE -- HLB-GPT ARGS...

On rank RANK, WHERE=step raises in the third optimizer step of the first run, WHERE=eval raises an
out-of-memory error in the first evaluation after a training step; every other rank runs the real code. The error message ends
with the time it was raised (seconds since the epoch). The failure is put in from
outside, by patching this process's `hlb_gpt.train` (the step) and `hlb_gpt.tasks.lm` (the evaluation) before the
command line runs.
"""

import os
import sys
import time

import torch

import hlb_gpt.tasks.lm as lm
import hlb_gpt.train as train
from hlb_gpt.cli import main


def fail_on(rank: int, where: str) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    if where == "step":
        real, calls = train.optimizer_step, []

        def failing_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError(f"injected failure on rank {rank} at {time.time():.3f}")
            return real(*args, **kwargs)

        train.optimizer_step = failing_step
    elif where == "eval":
        real_evaluate, evaluations = lm.evaluate, []

        def failing_evaluate(*args, **kwargs):
            evaluations.append(1)
            if len(evaluations) == 2:  # the first after training began (the first is the one at step 0)
                raise torch.OutOfMemoryError(
                    f"injected: out of memory in rank {rank}'s evaluation at {time.time():.3f}")
            return real_evaluate(*args, **kwargs)

        lm.evaluate = failing_evaluate
    else:
        raise SystemExit(f"unknown WHERE {where!r} (step or eval)")


if __name__ == "__main__":
    rank, where, sep, *args = sys.argv[1:]
    assert sep == "--", __doc__
    fail_on(int(rank), where)
    main(args)
