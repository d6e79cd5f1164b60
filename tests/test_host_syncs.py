"""The trainer's optimizer step reads nothing back from the device: whatever the optimizer and the filter, a
non-finite step is skipped on the device and the GPU runs ahead between the loop's sync points (DESIGN.md §4)."""

import contextlib

import pytest
import torch

from host_reads import HostReads

from hlb_gpt.grokfast import EMAFilter, MAFilter, NoFilter
from hlb_gpt.model import GPT, GPTConfig
from hlb_gpt.optim import GrokAdamW, make_muon, make_optimizer, make_scheduler, param_groups
from hlb_gpt.train import optimizer_step, skips_on_device

OPTIMIZERS = {
    "adamw": lambda groups, device: make_optimizer(groups, device_type=device.type),
    "grokadamw": lambda groups, device: GrokAdamW(groups),
    "muon": lambda groups, device: make_muon(groups, lr=0.02, momentum=0.95, device_type=device.type),
}
FILTERS = {
    "none": lambda named: NoFilter(),
    "ema": lambda named: EMAFilter(named, alpha=0.9, gain=0.1),
    "ma": lambda named: MAFilter(named, window=3, gain=0.1),
}


def parts(optimizer, grad_filter, device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, depth=2, width=32, max_seq_len=16)).to(device)
    named = list(model.named_parameters())
    opt = OPTIMIZERS[optimizer](param_groups(named, 2e-3, 0.01), device)
    return model, opt, make_scheduler(opt, warmup_steps=3), FILTERS[grad_filter](named)


def batches(n, device):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 16), generator=gen).to(device) for _ in range(n)]


def step(model, opt, sched, grad_filter, x):
    return optimizer_step(model, [(x, x)], list(model.parameters()), opt, sched, grad_filter, 1.0,
                          contextlib.nullcontext)


@pytest.mark.parametrize("grad_filter", list(FILTERS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_step_of_the_trainer_reads_nothing_back_from_the_device(optimizer, grad_filter):
    model, opt, sched, filt = parts(optimizer, grad_filter, torch.device("cpu"))
    assert skips_on_device(opt)
    with HostReads() as reads:
        for x in batches(3, torch.device("cpu")):  # the first step, which creates the state, and two more
            step(model, opt, sched, filt, x)
    assert reads.seen == []


def test_the_count_sees_the_one_read_of_a_step_whose_optimizer_cannot_skip_on_the_device():
    model, _, _, _ = parts("adamw", "none", torch.device("cpu"))
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)  # no found_inf, and no reads of its own
    with HostReads() as reads:
        step(model, sgd, make_scheduler(sgd), NoFilter(), batches(1, torch.device("cpu"))[0])
    assert reads.seen == ["_local_scalar_dense.default"]  # the trainer's check of the non-finite flag


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a CUDA device")
@pytest.mark.parametrize("grad_filter", list(FILTERS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_step_of_the_trainer_on_cuda_makes_no_host_sync(optimizer, grad_filter):
    device = torch.device("cuda")
    model, opt, sched, filt = parts(optimizer, grad_filter, device)
    xs = batches(3, device)
    step(model, opt, sched, filt, xs[0])  # the first step allocates the state
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs[1:]:
            step(model, opt, sched, filt, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
