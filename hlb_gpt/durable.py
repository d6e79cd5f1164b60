"""Durable writes: every file hlb-gpt keeps (records, checkpoints, the token cache, locks) is written here, so
each appears whole and survives a crash once written: a temporary name beside it, fsync, rename (or hard link),
then fsync of the folder, which makes the rename itself durable (POSIX)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """A name beside `path` that no other writer uses (its PID and a random part), so that processes writing the
    same file at once never write into each other's temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_durably(path: Path, write: Callable[[BinaryIO], object], how: str = "replace") -> bool:
    """Write `path` with `write(file)`, fsynced with its folder. `how`:

    - "replace": readers see the old file or the new one, never a part; always True.
    - "create": the file appears whole, and only if no file has that name (a hard link, which never replaces);
      False if one does. Raises OSError where the filesystem has no hard links.
    - "create in place": O_EXCL creation written in place, for filesystems without hard links (a reader may see
      it partly written); False if a file has that name.

    A write that fails (a full disk) leaves no temporary file and raises the OSError."""
    path = Path(path)
    if how == "create in place":
        try:
            f = open(path, "xb")
        except FileExistsError:
            return False
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path.parent)
        return True
    if how not in ("replace", "create"):
        raise ValueError(f"unknown way to write {path}: {how!r}")
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if how == "replace":
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; a no-op where folders cannot be opened or synced (not POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
