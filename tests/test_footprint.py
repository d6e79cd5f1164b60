"""The pre-flight checks of memory and disk: what a run will need, estimated from its config before any work, and
read on the device the rank will train on."""

import pytest
import torch

from hlb_gpt import train as train_module
from hlb_gpt.cli import main
from hlb_gpt.config import RunConfig

TINY = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes"]


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


class FakeCuda:
    """torch.cuda on a machine with `count` GPUs of `free` bytes each, recording which device is current and which
    device each memory query names. `set_device` fails as CUDA does for a GPU that does not exist."""

    def __init__(self, monkeypatch, count: int, free: int = 80 * 2**30) -> None:
        self.count, self.free = count, free
        self.current: int | None = None  # no context yet
        self.events: list[tuple[str, int | None]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "mem_get_info", self.mem_get_info)

    def set_device(self, device) -> None:
        index = torch.device(device).index
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.current = index
        self.events.append(("set_device", index))

    def mem_get_info(self, device=None):
        index = torch.device(device).index if device is not None else None
        # A device without an index means the current one, which without set_device is GPU 0.
        self.events.append(("mem_get_info", self.current if index is None else index))
        if self.current is None:
            self.current = 0  # reading memory opened a context on GPU 0
        return self.free, self.free


def torchrun_env(monkeypatch, rank: int, world: int, local_world: int | None = None) -> None:
    for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world,
                        "LOCAL_WORLD_SIZE": local_world or world}.items():
        monkeypatch.setenv(name, str(value))


# --- the device the check reads ------------------------------------------------------------------------------


def test_under_torchrun_each_rank_checks_the_memory_of_its_own_gpu_after_making_it_current(monkeypatch):
    gpus = FakeCuda(monkeypatch, count=4)
    torchrun_env(monkeypatch, rank=2, world=4)
    train_module.check_memory(RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", device="cuda", grokfast=True))
    assert gpus.events == [("set_device", 2), ("mem_get_info", 2)]


def test_more_torchrun_ranks_than_gpus_are_refused_in_one_line_on_every_rank(monkeypatch, capsys, tmp_path):
    for rank in (0, 1):
        gpus = FakeCuda(monkeypatch, count=1)
        torchrun_env(monkeypatch, rank=rank, world=2)
        code, _, err = run_main(TINY + ["--device", "cuda", "--out", str(tmp_path / "runs")], capsys)
        assert code == 2
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "--nproc_per_node=1" in err and "2 ranks" in err and "1 CUDA device" in err
        assert gpus.events == []  # refused before any rank touched a GPU
        assert not (tmp_path / "runs").exists()
