"""Who trains which run: `<run>/lock.<n>.json`, so that many processes can share one sweep.

Claiming creates the next number (an atomic create, also on NFS: one claimant wins); the highest lock is
current; a heartbeat thread keeps it fresh; a stale lock (a process of this host that is gone, or on another host
a heartbeat older than the timeout) is superseded by the next number, and the process that held it writes nothing
more to the run (`LockLost`). Lock files are never deleted. Hosts must agree on the time to well within the
timeout. No torch here: `hlb-gpt status` must stay fast. See docs/DESIGN.md, section 10.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hlb_gpt.durable import write_durably
from hlb_gpt.records import atomic_write_json

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
HEARTBEAT_S = 30.0
# How much later than its lock a holder's process may seem to have started before its PID is taken for reused
# by another process: procfs gives the start since boot, and the wall clock may have been stepped since.
START_SLACK_S = 60.0
_NAME = re.compile(r"^lock\.(\d+)\.json$")


@dataclass(frozen=True)
class Owner:
    """A process that can hold locks: this one by default."""

    host: str
    pid: int

    @classmethod
    def this_process(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid())

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


@dataclass(frozen=True)
class LockRecord:
    """What a lock file says: who holds it since when, their last heartbeat, and when they released it."""

    path: Path
    number: int
    owner: Owner
    started: float
    heartbeat: float
    released: float | None = None

    def heartbeat_age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def is_stale(self, timeout_s: float, now: float | None = None) -> bool:
        """Its process is gone. On this host the PID says so: a live process holds its lock however old its
        heartbeat (it may be paused: SIGSTOP, a debugger), unless its PID now names a process started after the
        lock. On another host, a heartbeat older than the timeout says so."""
        if self.owner.host == socket.gethostname():
            if not pid_alive(self.owner.pid):
                return True
            began = process_started(self.owner.pid)
            return began is not None and began > self.started + START_SLACK_S
        return self.heartbeat_age(now) > timeout_s

    def state(self, timeout_s: float, now: float | None = None) -> str:
        """released, stale or held."""
        if self.released is not None:
            return "released"
        return "stale" if self.is_stale(timeout_s, now) else "held"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs under `pid`; a zombie (killed, not yet reaped) does not run."""
    if pid <= 0:  # kill() would address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: trust kill(0)
    return state not in ("Z", "X")


def process_started(pid: int) -> float | None:
    """When the process `pid` of this host started, in seconds since the epoch; None where procfs does not say."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: since boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class LockLost(RuntimeError):
    """This process's lock on a run was superseded: another process took it for stale and now trains the run.
    Raised before any further write of this process to the run; the sweep goes on with its next run."""

    def __init__(self, message: str, holder: Owner | None = None) -> None:
        super().__init__(message)
        self.holder = holder  # the process that holds the run now


def read_lock(run_dir: Path) -> LockRecord | None:
    """The run's current lock (its highest-numbered one), or None if it was never locked."""
    found = _lock_files(Path(run_dir))
    if not found:
        return None
    number, path = found[-1]
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return LockRecord(path, number, Owner(str(d["host"]), int(d["pid"])), float(d["started"]),
                          float(d["heartbeat"]), None if d.get("released") is None else float(d["released"]))
    except (OSError, ValueError, TypeError, KeyError):
        # Unreadable (being written where links are unsupported, or damaged): its age is its file's age.
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        return LockRecord(path, number, Owner("?", -1), mtime, mtime)


def try_claim(run_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S, owner: Owner | None = None,
              heartbeat_s: float | None = None) -> RunLock | None:
    """Claim the run for `owner` (this process): a lock it now holds, or None when a live process holds it or
    another process claimed it first. A stale or released lock is superseded. The lock's heartbeat runs in a
    background thread until `release()`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    current = read_lock(run_dir)
    if current is not None and current.state(timeout_s) == "held":
        return None
    number = 0 if current is None else current.number + 1
    owner = owner or Owner.this_process()
    now = time.time()
    record = LockRecord(run_dir / f"lock.{number}.json", number, owner, now, now)
    if not _create(record.path, _as_json(record)):
        return None  # a faster process took this number
    if current is not None and current.released is None:
        logger.warning("%s: took over the stale lock of %s (heartbeat %s ago)", run_dir.name, current.owner,
                       format_age(current.heartbeat_age(now)))
    lock = RunLock(record, heartbeat_s if heartbeat_s is not None else min(HEARTBEAT_S, timeout_s / 4))
    lock.start()
    return lock


class RunLock:
    """A held lock: refreshes its heartbeat in a daemon thread, notices if it was superseded (`check`), and is
    released once (a context manager, or `release()`). Once superseded it writes nothing more, its own file
    included."""

    def __init__(self, record: LockRecord, heartbeat_s: float) -> None:
        self.record = record
        self.lost_to: LockRecord | None = None
        self._interval = heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lock-{record.path.parent.name}", daemon=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def start(self) -> None:
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and mark the lock released (the file stays, as history)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            if not self._superseded():
                self._write(released=time.time())
        except OSError as exc:  # the run's own outcome matters more: the lock goes stale on its own
            logger.warning("%s: could not mark the lock released (%s); it counts as stale once this process "
                           "ends", self.record.path, exc)

    def check(self, look: bool = True) -> None:
        """Raise LockLost if another process superseded this lock. Before every write to the run (`look`: read
        the run's locks now, since a paused process learns nothing from its heartbeat before it writes); at every
        step without `look`, for what the heartbeat found (no I/O)."""
        if (self._superseded() if look else self.lost_to is not None):
            holder = self.lost_to.owner
            raise LockLost(f"{self.record.path.parent}: the run was taken over by {holder}, to which this "
                           "process's lock looked stale; this process stopped writing to it", holder)

    def beat(self) -> None:
        """Refresh the heartbeat, unless another process superseded this lock (then `lost_to` says who)."""
        if not self._superseded():
            self._write()

    def _superseded(self) -> bool:
        if self.lost_to is None:
            current = read_lock(self.record.path.parent)
            if current is not None and current.number > self.record.number:
                self.lost_to = current
        return self.lost_to is not None

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except OSError as exc:  # a full or unreachable disk: keep training, try again next time
                logger.warning("%s: could not refresh the lock's heartbeat (%s)", self.record.path, exc)

    def _write(self, released: float | None = None) -> None:
        self.record = LockRecord(self.record.path, self.record.number, self.record.owner, self.record.started,
                                 time.time(), released)
        atomic_write_json(self.record.path, _as_json(self.record))


def parse_duration(text: str) -> float:
    """Seconds in `text`: a plain number of seconds, or a number with a unit, as in 90s, 10m or 1.5h."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a positive duration such as 600, 90s, 10m or 1.5h (got {text!r})")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def format_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _lock_files(run_dir: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(run_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((int(m.group(1)), run_dir / name) for name in names if (m := _NAME.match(name)))


def _as_json(record: LockRecord) -> dict[str, object]:
    return {"host": record.owner.host, "pid": record.owner.pid, "started": record.started,
            "heartbeat": record.heartbeat, "released": record.released}


def _create(path: Path, content: dict[str, object]) -> bool:
    """Create `path` holding `content` if no file has that name; False if one does. The content is written to a
    unique temporary file and hard-linked into place, so the lock appears whole; where hard links are not
    supported, O_EXCL creates it and an unreadable lock counts as fresh (readers use its file's age)."""
    data = (json.dumps(content) + "\n").encode("utf-8")
    try:
        return write_durably(path, lambda f: f.write(data), how="create")
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem
        return write_durably(path, lambda f: f.write(data), how="create in place")
