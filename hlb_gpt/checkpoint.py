"""Checkpoints: written atomically (temporary name, fsync, rename), loaded with `weights_only=True`, pruned to
the newest few; and the RNG states they carry. See docs/DESIGN.md, section 9 (Run records).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from hlb_gpt.durable import write_durably

logger = logging.getLogger(__name__)

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line that says why."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file that is damaged or cut short (not one that holds disallowed objects)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk); the message names the file and the reason."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


@dataclass(frozen=True)
class FileStamp:
    """A file as one process sees it: another process (a rank on another node) that sees the same path, size and
    modification time reads the same checkpoint, so it may load it itself rather than be sent it."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = Path(path).stat()
        return cls(Path(path), st.st_size, st.st_mtime_ns)

    def visible(self) -> bool:
        """Whether this process sees the same file."""
        try:
            return FileStamp.of(self.path) == self
        except OSError:
            return False


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, then delete all but the newest `keep` checkpoints."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:09d}.pt"

    def write(f: BinaryIO) -> None:
        out = _KeepWriteError(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise  # not a failed write: a bug worth its traceback
            raise out.error from None

    try:
        write_durably(path, write)
    except OSError as error:
        reason = "no space left on the device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise CheckpointWriteError(error.errno, f"cannot write {path}: {reason}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class _KeepWriteError:
    """A file whose failed write is kept: torch.save turns it (ENOSPC) into a RuntimeError that no longer says why."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: Path | BinaryIO) -> dict[str, Any]:
    """The checkpoint's state. CorruptCheckpoint if the file is damaged or truncated; CheckpointError if it holds
    anything but tensors and plain data (weights_only refuses a disallowed global: never run, never skipped)."""
    try:
        if _head(path) != b"PK\x03\x04":  # torch.save writes zip archives: anything else is damaged
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated (not a zip archive)")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # torch's reason follows "WeightsUnpickler error:", on its line or the next; the rest is advice to users
        # of torch.load, not to ours.
        after = text.partition("WeightsUnpickler error:")[2]
        detail = next((line.strip() for line in after.splitlines() if line.strip()), "")
        if "Unsupported global" in text:
            first = detail.split(". Please")[0] if detail else text.strip().splitlines()[0]
            raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                                  f"(weights_only load failed: {first})") from None
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated ({detail or 'unpickling failed'})") from None
    except (EOFError, RuntimeError, IndexError, KeyError, ValueError, TypeError, AttributeError) as exc:
        # Damaged bytes inside the archive fail wherever the unpickler happens to trip on them.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". This is an internal")[0]
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or truncated ({first})") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def _head(source: Path | BinaryIO) -> bytes:
    """The first 4 bytes of a file, or of a binary stream left where it was."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(4)
    at = source.tell()
    head = source.read(4)
    source.seek(at)
    return head


# ----------------------------------------------------------------------------------------------- RNG


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random generator a run could touch, in types `weights_only` loading accepts: the CPU's, and the
    generator of the run's own CUDA device when it trains on one (never the other devices of the machine: a
    checkpoint must resume on a machine with fewer of them, and reading them would start a context on each)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s generators; the saved CUDA generator goes to the run's own CUDA device.

    Under torchrun rank 0 writes the checkpoint, so every rank resumes with rank 0's CUDA generator: the ranks
    are seeded alike and draw alike, so theirs were equal. Checkpoints of earlier versions hold a list, one
    state per device of the machine that wrote them: the first is the one a run used (rank 0, or the default
    device of a single process).
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):
        cuda = cuda[0] if cuda else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
