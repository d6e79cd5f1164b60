"""Failures at bad moments: a full disk, a damaged checkpoint or record. Each is contained and told in one line.

One table of cases. A disk case runs twice: on a small tmpfs filled to the brim at the chosen moment (a real
ENOSPC, where the test may mount one), and with writes under the run folder failing with ENOSPC by
monkeypatching (everywhere).
"""

import builtins
import errno
import json
import logging
import os
import subprocess
import uuid
from pathlib import Path

import pytest

import hlb_gpt.sweep as sweep_module

from hlb_gpt import checkpoint, data, durable, records
from hlb_gpt import train as train_module
from hlb_gpt.cli import main
from hlb_gpt.compare import load_runs
from hlb_gpt.config import RunConfig
from hlb_gpt.records import RunWriter, read_run
from hlb_gpt.sweep import run_sweep
from hlb_gpt.train import train

TMPFS_BYTES = 8 * 2**20


def small_run(cache: Path, **changes) -> RunConfig:
    # 12 steps of 128 tokens: an evaluation every 2 steps, a checkpoint every 4.
    n_train = 1_290_590  # mini with --tokenizer bytes
    values = dict(dataset="mini", tokenizer="bytes", preset="tiny", depth=1, width=32, seq_len=32, batch_size=4,
                  eval_tokens=1024, max_steps=12, evals_per_epoch=n_train // 256,
                  checkpoint_every=512 / n_train, data_cache=str(cache))
    return RunConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("tokens")
    data.load_tokens("mini", data.get_tokenizer("bytes"), cache)
    return cache


# ----------------------------------------------------------------------------------------------- the disk


class FullFile:
    """A file whose writes fail with ENOSPC while its disk is full."""

    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, payload):
        if self._disk.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(payload)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class Disk:
    """A folder on a disk that `fill()` makes full and `free()` frees again."""

    def __init__(self, root: Path, kind: str, monkeypatch):
        self.root, self.kind, self.full = root, kind, False
        root.mkdir()
        if kind == "plain":  # a folder on the test's own disk, never full
            return
        if kind == "tmpfs":
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(root)],
                                     capture_output=True, text=True)
            if mounted.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}); "
                            "the monkeypatched variant of this case still runs")
        else:
            self._patch(monkeypatch)

    def _under(self, path) -> bool:
        return Path(path).resolve().is_relative_to(self.root.resolve())

    def _patch(self, monkeypatch):
        real_open = builtins.open

        def fake_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return FullFile(f, self) if set(mode) & set("wax+") and self._under(path) else f

        # Every kept file is written by `durable` (metrics rows are appended by `records`): they look `open` up
        # in their module first.
        for module in (records, durable):
            monkeypatch.setattr(module, "open", fake_open, raising=False)

    def fill(self):
        self.full = True
        if self.kind == "tmpfs":
            chunk = b"\0" * 2**16
            with open(self.root / f"filler-{uuid.uuid4().hex}", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    def free(self):
        self.full = False
        for filler in self.root.glob("filler-*"):
            filler.unlink()

    def close(self):
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], check=True)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def full_during(disk: Disk, fn, keep_full: bool = False):
    """`fn`, called with the disk full (and freed afterwards unless `keep_full`)."""

    def wrapped(*args, **kwargs):
        disk.fill()
        try:
            return fn(*args, **kwargs)
        finally:
            if not keep_full:
                disk.free()

    return wrapped


def first_call_only(wrapper, fn):
    calls = []

    def once(*args, **kwargs):
        calls.append(1)
        return (wrapper(fn) if len(calls) == 1 else fn)(*args, **kwargs)

    return once


def sweep_of_two(disk: Disk, cache: Path, **changes):
    """Seeds 0 and 1 into the disk; every run starts with the disk freed (a user freeing space meanwhile)."""

    def train_fn(cfg, run_dir, **kwargs):
        disk.free()
        return train(cfg, run_dir, **kwargs)

    def claim(*args, **kwargs):  # the space is freed before the run is claimed (its lock is a file too)
        disk.free()
        return claim_run(*args, **kwargs)

    configs = [small_run(cache, seed=s, **changes) for s in (0, 1)]
    with pytest.MonkeyPatch.context() as patch:
        claim_run = sweep_module.claim
        patch.setattr(sweep_module, "claim", claim)
        return run_sweep(configs, disk.root / "sweep", train_fn=train_fn, progress=False)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# ----------------------------------------------------------------------------------------------- the cases


def disk_full_during_a_checkpoint(disk, cache, monkeypatch, caplog, capsys):
    monkeypatch.setattr(train_module, "save_checkpoint",
                        first_call_only(lambda fn: full_during(disk, fn), train_module.save_checkpoint))
    summary = train(small_run(cache), disk.root / "run", progress=False)
    assert summary["status"] == "completed" and summary["steps"] == 12  # training went on
    [line] = [m for m in messages(caplog) if "could not write" in m]
    assert "periodic checkpoint at step 4" in line and "step-000000004.pt: no space left" in line
    assert [p.name for p in checkpoint.list_checkpoints(disk.root / "run")] == ["step-000000008.pt",
                                                                              "step-000000012.pt"]


def disk_full_while_appending_metrics(disk, cache, monkeypatch, caplog, capsys):
    monkeypatch.setattr(RunWriter, "append_metrics",
                        first_call_only(lambda fn: full_during(disk, fn), RunWriter.append_metrics))
    results = sweep_of_two(disk, cache)
    assert [r.status for r in results] == ["failed", "completed"]  # the sweep went on to the next run
    run = read_run(disk.root / "sweep" / "baseline-s0")
    assert run.status == "failed"
    assert "metrics.jsonl: no space left on the device" in run.summary["error"]
    [line] = [m for m in messages(caplog) if "baseline-s0 failed" in m]
    assert f"cannot write {disk.root / 'sweep' / 'baseline-s0' / 'metrics.jsonl'}: no space left" in line


def disk_full_while_appending_metrics_and_after(disk, cache, monkeypatch, caplog, capsys):
    monkeypatch.setattr(RunWriter, "append_metrics",
                        first_call_only(lambda fn: full_during(disk, fn, keep_full=True), RunWriter.append_metrics))
    results = sweep_of_two(disk, cache)
    assert [r.status for r in results] == ["failed", "completed"]
    assert read_run(disk.root / "sweep" / "baseline-s0").status is None  # no summary could be written: said so
    said = messages(caplog)
    assert any("metrics.jsonl: no space left" in m and "baseline-s0 failed" in m for m in said)
    assert any("summary.json: no space left" in m and "no summary" in m for m in said)


def disk_full_while_writing_the_summary(disk, cache, monkeypatch, caplog, capsys):
    monkeypatch.setattr(RunWriter, "write_summary",
                        first_call_only(lambda fn: full_during(disk, fn, keep_full=True), RunWriter.write_summary))
    results = sweep_of_two(disk, cache)
    assert [r.status for r in results] == ["failed", "completed"]
    assert "summary.json: no space left on the device" in results[0].summary["error"]
    said = messages(caplog)
    assert any("baseline-s0 failed" in m and "summary.json: no space left" in m for m in said)


def data_cache_full(disk, cache, monkeypatch, caplog, capsys):
    full_cache = disk.root / "cache"
    full_cache.mkdir()
    disk.fill()
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "mini", "--tokenizer", "bytes", "--preset", "tiny", "--data-cache", str(full_cache),
              "--out", str(disk.root.parent / "out"), "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("Error:")]
    assert line.startswith(f"Error: cannot write the token cache {full_cache}/mini.train.bytes.")
    assert "no space left on the device" in line and "--data-cache" in line
    assert list(full_cache.iterdir()) == []


def corrupt_newest_checkpoint(root, cache, caplog, damage):
    cfg = small_run(cache, keep_checkpoints=3)
    assert train(cfg, root / "run", progress=False)["status"] == "completed"
    newest = checkpoint.latest_checkpoint(root / "run")
    damage(newest)
    longer = cfg.replace(max_steps=16)
    summary = train(longer, root / "run", progress=False, resume=True)
    assert summary["status"] == "completed" and summary["steps"] == 16
    said = messages(caplog)
    [warning] = [m for m in said if "corrupt or truncated" in m]
    assert str(newest) in warning and "refusing" not in warning
    assert any("resumed at step 8" in m for m in said)
    assert (newest.parent / (newest.name + ".corrupt")).exists()


def truncated_newest_checkpoint(disk, cache, monkeypatch, caplog, capsys):
    corrupt_newest_checkpoint(disk.root, cache, caplog, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))


def garbage_newest_checkpoint(disk, cache, monkeypatch, caplog, capsys):
    corrupt_newest_checkpoint(disk.root, cache, caplog, lambda p: p.write_bytes(os.urandom(4096)))


def config_json_not_json(disk, cache, monkeypatch, caplog, capsys):
    out = disk.root / "sweep"
    (out / "baseline-s0").mkdir(parents=True)
    (out / "baseline-s0" / "config.json").write_text('{"epochs": 1.0,')
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "mini", "--tokenizer", "bytes", "--preset", "tiny", "--depth", "1", "--width", "32",
              "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "1024", "--max-steps", "4", "--seed", "0,1",
              "--data-cache", str(cache), "--out", str(out), "-q"])
    out_text, err = capsys.readouterr()
    assert exc.value.code == 1 and "Traceback" not in err
    assert "baseline-s0: failed" in out_text and "baseline-s1: completed" in out_text
    [line] = [m for m in messages(caplog) if "baseline-s0 failed" in m]
    assert f"{out / 'baseline-s0' / 'config.json'} is not valid JSON (line 1, column" in line


def corrupt_line_inside_metrics(disk, cache, monkeypatch, caplog, capsys):
    run_dir = disk.root / "sweep" / "baseline-s0"
    writer = RunWriter(run_dir)
    writer.write_config(small_run(cache).to_dict())
    rows = [{"epoch": e, "step": 2 * e, "tokens": 0, "train_loss": 3.0, "val_loss": 3.0 - e, "lr": 1e-3,
             "grad_norm": 1.0, "ema_ratio": None, "time_s": 1.0, "tokens_per_s": 1.0} for e in (1, 2, 3)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, '{"epoch": 1.5, "step": 3, "val_lo\x00\x00\x00')  # bytes lost in a crash
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "st')  # and a kill mid-row
    writer.write_summary({"status": "completed"})
    runs, notes = load_runs([disk.root / "sweep"])
    assert [r["epoch"] for r in runs[0].metrics] == [1, 2, 3]  # the rows after the bad one are read
    assert [n for n in notes if "metrics.jsonl" in n] == [
        f"{run_dir / 'metrics.jsonl'}:2: not valid JSON (Invalid control character at), skipped"]  # the cut row: silent


DISK_CASES = [disk_full_during_a_checkpoint, disk_full_while_appending_metrics,
              disk_full_while_appending_metrics_and_after, disk_full_while_writing_the_summary, data_cache_full]
OTHER_CASES = [truncated_newest_checkpoint, garbage_newest_checkpoint, config_json_not_json,
               corrupt_line_inside_metrics]


@pytest.mark.parametrize("case, disk_kind", [
    *[pytest.param(case, kind, id=f"{case.__name__}-{kind}") for case in DISK_CASES for kind in ("tmpfs", "patched")],
    *[pytest.param(case, "plain", id=case.__name__) for case in OTHER_CASES],
])
def test_a_failure_at_a_bad_moment_is_contained_and_told_in_one_line(case, disk_kind, tmp_path, token_cache,
                                                                      monkeypatch, caplog, capsys):
    disk = Disk(tmp_path / "disk", disk_kind, monkeypatch)
    try:
        with caplog.at_level(logging.INFO, logger="hlb_gpt"):
            case(disk, token_cache, monkeypatch, caplog, capsys)
        assert not any("Traceback" in m for m in messages(caplog))
        assert leftovers(tmp_path) == []  # no temporary file is left behind
    finally:
        disk.free()
        disk.close()
