"""The run lock: one holder at a time, stale locks taken over by exactly one process, heartbeats, release."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from hlb_gpt.locks import Owner, parse_duration, pid_alive, read_lock, try_claim

ELSEWHERE = Owner("another-host", 4242)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leave_lock(run_dir, owner, heartbeat_age=0.0, started_age=None):
    """The lock a killed process leaves behind: never released, its heartbeat as old as it was at the kill."""
    beat = time.time() - heartbeat_age
    started = beat if started_age is None else time.time() - started_age
    (run_dir / "lock.0.json").write_text(json.dumps(
        {"host": owner.host, "pid": owner.pid, "started": started, "heartbeat": beat, "released": None}))


def test_a_free_run_is_claimed_by_one_process_and_refused_to_the_next(tmp_path):
    first = try_claim(tmp_path / "run")
    assert first is not None
    try:
        assert try_claim(tmp_path / "run") is None
        assert try_claim(tmp_path / "run", owner=ELSEWHERE) is None
        record = read_lock(tmp_path / "run")
        assert record.owner == Owner(socket.gethostname(), __import__("os").getpid())
        assert record.state(600) == "held" and record.number == 0
    finally:
        first.release()


def test_a_lock_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path):
    gone = Owner(socket.gethostname(), dead_pid())
    assert not pid_alive(gone.pid)
    leave_lock(tmp_path, gone)
    assert read_lock(tmp_path).state(600) == "stale"
    taker = try_claim(tmp_path, timeout_s=600)
    assert taker is not None and taker.record.number == 1
    taker.release()


def test_a_lock_on_another_host_is_held_until_its_heartbeat_is_older_than_the_timeout(tmp_path):
    leave_lock(tmp_path, ELSEWHERE)
    record = read_lock(tmp_path)
    assert not record.is_stale(60, now=record.heartbeat + 59)
    assert record.is_stale(60, now=record.heartbeat + 61)
    assert try_claim(tmp_path, timeout_s=0.5) is None
    time.sleep(0.7)
    taker = try_claim(tmp_path, timeout_s=0.5)
    assert taker is not None and read_lock(tmp_path).owner == Owner.this_process()
    taker.release()


def test_the_heartbeat_keeps_a_live_lock_from_going_stale(tmp_path):
    lock = try_claim(tmp_path, timeout_s=0.4, owner=ELSEWHERE)  # a beat every 0.1 s
    try:
        time.sleep(1.0)
        assert read_lock(tmp_path).heartbeat_age() < 0.4
        assert try_claim(tmp_path, timeout_s=0.4) is None
    finally:
        lock.release()


@pytest.mark.parametrize("attempt", range(5))
def test_of_many_processes_racing_to_take_over_one_stale_lock_exactly_one_wins(tmp_path, attempt):
    leave_lock(tmp_path, ELSEWHERE, heartbeat_age=3600)
    start, winners = threading.Barrier(8), []

    def race(i: int) -> None:
        start.wait()
        lock = try_claim(tmp_path, owner=Owner(f"racer-{i}", i), heartbeat_s=3600)
        if lock is not None:
            winners.append(lock)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert read_lock(tmp_path).owner == winners[0].record.owner
    for lock in winners:
        lock.release()


def test_a_released_lock_frees_the_run_and_stays_as_history(tmp_path):
    lock = try_claim(tmp_path)
    lock.release()
    record = read_lock(tmp_path)
    assert record.state(600) == "released"
    again = try_claim(tmp_path, owner=ELSEWHERE)
    assert again is not None and again.record.number == 1
    again.release()
    assert json.loads((tmp_path / "lock.0.json").read_text())["released"] is not None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_holder_whose_lock_was_taken_over_learns_it_at_its_next_heartbeat(tmp_path):
    slow = try_claim(tmp_path, owner=ELSEWHERE, heartbeat_s=3600)
    time.sleep(0.3)
    taker = try_claim(tmp_path, timeout_s=0.2)
    assert taker is not None
    slow.beat()
    assert slow.lost_to is not None and slow.lost_to.owner == Owner.this_process()
    assert read_lock(tmp_path).owner == Owner.this_process()  # the late heartbeat does not take it back
    slow.release()
    taker.release()


@pytest.mark.parametrize("text, seconds", [("600", 600), ("90s", 90), ("10m", 600), ("1.5h", 5400), ("2s", 2)])
def test_lock_timeouts_are_read_in_seconds_minutes_or_hours(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "10 minutes", "m", ""])
def test_a_lock_timeout_that_is_not_a_positive_duration_is_refused(text):
    with pytest.raises(ValueError, match="positive duration"):
        parse_duration(text)


def test_a_live_process_on_this_host_holds_its_lock_however_old_its_heartbeat(tmp_path):
    """A paused process (SIGSTOP, a debugger, a swapped-out machine) sends no heartbeat but is not gone."""
    leave_lock(tmp_path, Owner.this_process(), heartbeat_age=2)  # claimed by this process, then paused for 2 s
    assert read_lock(tmp_path).state(timeout_s=0.5) == "held"
    assert try_claim(tmp_path, timeout_s=0.5, owner=ELSEWHERE) is None


def test_a_lock_whose_pid_now_belongs_to_a_process_started_after_it_is_stale(tmp_path):
    """The PID of a process that died was reused by one started since: the lock's holder is gone all the same."""
    leave_lock(tmp_path, Owner.this_process(), started_age=10 * 24 * 3600)  # claimed before this process began
    assert read_lock(tmp_path).state(timeout_s=600) == "stale"


def test_a_holder_whose_lock_was_taken_over_is_refused_its_next_write(tmp_path):
    from hlb_gpt.locks import LockLost

    slow = try_claim(tmp_path, owner=ELSEWHERE, heartbeat_s=3600)
    slow.check()  # still its own: writing is allowed
    time.sleep(0.3)
    taker = try_claim(tmp_path, timeout_s=0.2)
    with pytest.raises(LockLost, match=f"taken over by {Owner.this_process()}"):
        slow.check()  # no heartbeat since: the check itself reads the locks
    before = (tmp_path / "lock.0.json").read_text()
    slow.beat()
    slow.release()
    assert (tmp_path / "lock.0.json").read_text() == before  # the loser writes nothing more, not even its lock
    taker.check()
    taker.release()
