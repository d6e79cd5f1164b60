"""Every file hlb-gpt keeps is written by one helper that fsyncs the file and then its folder."""

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync of the test: ("file" or "dir", the path the descriptor names)."""
    seen, real = [], os.fsync

    def record(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        seen.append((kind, Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def write_record(folder: Path) -> Path:
    from hlb_gpt.records import atomic_write_json

    atomic_write_json(folder / "summary.json", {"status": "completed"})
    return folder / "summary.json"


def write_checkpoint(folder: Path) -> Path:
    from hlb_gpt.checkpoint import save_checkpoint

    return save_checkpoint(folder, 7, {"model": {"w": torch.ones(2)}}, keep=1)


def write_token_cache(folder: Path) -> Path:
    from hlb_gpt.data import _write_cache

    _write_cache(folder / "t.bin", folder / "t.json", {"key": 1}, np.arange(4, dtype=np.uint16))
    return folder / "t.json"


def write_lock(folder: Path) -> Path:
    from hlb_gpt.locks import try_claim

    lock = try_claim(folder / "run", heartbeat_s=3600)
    lock.release()  # rewrites the lock: a replace, after the claim's create
    return lock.record.path


WRITERS = {"records": write_record, "checkpoint": write_checkpoint, "token cache": write_token_cache,
           "lock": write_lock}


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_each_writer_fsyncs_the_file_it_writes_and_then_its_folder(tmp_path, fsyncs, writer):
    path = writer(tmp_path)
    assert path.exists()
    kinds = [kind for kind, p in fsyncs if p.parent == path.parent or p == path.parent]
    assert "file" in kinds and kinds[-1] == "dir" and ("dir", path.parent) in fsyncs


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_each_writer_writes_through_the_one_durable_helper(tmp_path, monkeypatch, writer):
    from hlb_gpt import durable

    original, calls = durable.write_durably, []

    def spy(path, write, how="replace"):
        calls.append((Path(path), how))
        return original(path, write, how)

    for name, module in list(sys.modules.items()):
        if name.startswith("hlb_gpt") and getattr(module, "write_durably", None) is original:
            monkeypatch.setattr(module, "write_durably", spy)
    path = writer(tmp_path)
    assert path in [p for p, _ in calls]
    assert not list(path.parent.glob(".*.tmp"))


def test_a_durable_write_fsyncs_the_file_then_the_folder_and_leaves_no_temporary_file(tmp_path, fsyncs):
    from hlb_gpt.durable import write_durably

    assert write_durably(tmp_path / "a", lambda f: f.write(b"new"))
    assert [kind for kind, _ in fsyncs] == ["file", "dir"] and fsyncs[1][1] == tmp_path
    assert (tmp_path / "a").read_bytes() == b"new" and os.listdir(tmp_path) == ["a"]


def test_create_never_replaces_a_file_and_says_so(tmp_path):
    from hlb_gpt.durable import write_durably

    for how in ("create", "create in place"):
        path = tmp_path / how
        assert write_durably(path, lambda f: f.write(b"first"), how=how)
        assert not write_durably(path, lambda f: f.write(b"second"), how=how)
        assert path.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["create", "create in place"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    from hlb_gpt.durable import write_durably

    (tmp_path / "a").write_bytes(b"old")

    def full_disk(f):
        f.write(b"par")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_durably(tmp_path / "a", full_disk)
    assert (tmp_path / "a").read_bytes() == b"old" and os.listdir(tmp_path) == ["a"]
