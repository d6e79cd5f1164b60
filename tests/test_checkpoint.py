"""Checkpoints across machines (the CUDA generator saved and restored is the run's own device's, CUDA mocked), and damaged ones."""

import random

import pytest
import torch

from hlb_gpt import checkpoint as ckpt
from hlb_gpt.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


def fake_gpus(monkeypatch, count: int) -> dict[int, torch.Tensor]:
    """A machine with `count` CUDA devices, each generator state a distinct byte pattern; indexing a device
    that is not there raises IndexError, as torch's `default_generators[i]` does."""
    states = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(count)}

    def index(device="cuda"):
        i = torch.device(device).index if not isinstance(device, int) else device
        if (i or 0) >= count:
            raise IndexError(f"no CUDA device {i} on a machine with {count}")
        return i or 0

    def set_state(new_state, device="cuda"):
        states[index(device)] = new_state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[index(device)].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[i].clone() for i in range(count)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda all_: [set_state(s, i) for i, s in enumerate(all_)])
    return states


def test_a_checkpoint_saved_on_an_8_gpu_node_resumes_on_a_1_gpu_node(monkeypatch, tmp_path):
    eight = fake_gpus(monkeypatch, 8)
    saved = ckpt.rng_state(torch.device("cuda", 0))
    assert torch.equal(saved["cuda"], eight[0])  # the run's device only, not all eight
    save_checkpoint(tmp_path, 1, {"rng": saved}, keep=1)

    one = fake_gpus(monkeypatch, 1)
    ckpt.set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"], torch.device("cuda", 0))
    assert torch.equal(one[0], torch.full((16,), 1, dtype=torch.uint8))


def test_a_rank_restores_the_saved_cuda_generator_into_its_own_device(monkeypatch):
    gpus = fake_gpus(monkeypatch, 8)
    saved = ckpt.rng_state(torch.device("cuda", 0))
    ckpt.set_rng_state(saved, torch.device("cuda", 5))
    assert torch.equal(gpus[5], gpus[0])
    assert all(torch.equal(gpus[i], torch.full((16,), i + 1, dtype=torch.uint8)) for i in range(8) if i not in (0, 5))


def test_an_older_checkpoint_with_every_device_s_state_resumes_on_fewer_devices(monkeypatch, tmp_path):
    eight = fake_gpus(monkeypatch, 8)
    legacy = {**ckpt.rng_state(), "cuda": [eight[i].clone() for i in range(8)]}
    save_checkpoint(tmp_path, 1, {"rng": legacy}, keep=1)
    one = fake_gpus(monkeypatch, 1)
    ckpt.set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))["rng"], torch.device("cuda", 0))
    assert torch.equal(one[0], torch.full((16,), 1, dtype=torch.uint8))


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_a_run_off_cuda_saves_no_cuda_generator_even_where_cuda_is_present(monkeypatch, device):
    fake_gpus(monkeypatch, 2)
    assert "cuda" not in ckpt.rng_state(device)


def test_a_damaged_checkpoint_of_any_kind_is_reported_corrupt_never_an_unpickler_error(tmp_path):
    """Random bytes, cut files and flipped bytes each trip torch's unpickler somewhere else (IndexError, KeyError,
    ...): all of them must read as a corrupt checkpoint, which resume sets aside for the one before it."""
    torch.save({"model": {"w": torch.ones(8, 8)}, "step": 3}, tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    rng = random.Random(0)
    for i in range(150):
        damaged = bytearray(good)
        if i % 3 == 0:
            damaged = bytearray(rng.randbytes(4096))
        elif i % 3 == 1:
            damaged = damaged[:rng.randrange(len(good))]
        else:
            for _ in range(5):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path = tmp_path / f"step-{i:09d}.pt"
        path.write_bytes(bytes(damaged))
        try:
            load_checkpoint(path)
        except CheckpointError:
            pass
