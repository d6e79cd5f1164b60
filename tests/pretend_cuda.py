"""`hlb-gpt` in a process that believes it has COUNT CUDA devices (not collected by pytest): on a machine without
a GPU, it shows how torchrun with more ranks than GPUs is refused.

    torchrun --standalone --nproc_per_node=2 tests/pretend_cuda.py 1 -- --device cuda HLB-GPT ARGS...

Only the refusal is real: with COUNT at least the ranks per node, the run goes on and fails at its first CUDA call.
"""

import sys

import torch

from hlb_gpt.cli import main

if __name__ == "__main__":
    count, sep, *args = sys.argv[1:]
    assert sep == "--", __doc__
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: int(count)
    main(args)
