"""Several processes on one sweep: they split the grid, take over the runs of dead ones, and `status` shows it."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hlb_gpt.checkpoint import list_checkpoints
from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.locks import Owner, read_lock
from hlb_gpt.records import RunWriter, atomic_write_text, read_run
from hlb_gpt.sweep import expand_grid, run_sweep

BASE = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes")
ELSEWHERE = Owner("another-host", 4242)
TIME_KEYS = {"time_s", "tokens_per_s"}
SMALL = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--depth", "1", "--width", "32",
         "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "1024", "-q"]


def fake_train():
    calls = []

    def train(cfg, run_dir, progress=True, resume=False):
        calls.append((run_dir.name, resume))
        writer = RunWriter(run_dir)
        writer.write_config(cfg.to_dict())
        writer.append_metrics({"epoch": 1.0, "step": 1, "tokens": 1, "train_loss": 2.0, "val_loss": 2.5, "lr": 0.1,
                               "grad_norm": 1.0, "ema_ratio": None, "time_s": 0.1, "tokens_per_s": 10.0})
        summary = {"status": "failed" if cfg.seed == 9 else "completed", "best_val_loss": 2.5}
        writer.write_summary(summary)
        return summary

    return train, calls


def leave_lock(run_dir, owner, heartbeat_age=0.0):
    """The lock a process leaves while it trains (or after it was killed): never released."""
    run_dir.mkdir(parents=True, exist_ok=True)
    beat = time.time() - heartbeat_age
    (run_dir / "lock.0.json").write_text(json.dumps(
        {"host": owner.host, "pid": owner.pid, "started": beat, "heartbeat": beat, "released": None}))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def seeds(*values):
    return expand_grid(BASE, {"seed": list(values)}, grokfast=False, baseline=False)


def hlb(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "hlb_gpt", *args], capture_output=True, text=True, **kwargs)


def numbers(run_dir):
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in read_run(run_dir).metrics]


# ------------------------------------------------------------------------------------------ claiming, in-process


def test_a_run_held_by_a_live_process_is_left_to_it_and_reported_as_running(tmp_path):
    leave_lock(tmp_path / "baseline-s1", ELSEWHERE)
    train, calls = fake_train()
    results = run_sweep(seeds(0, 1, 2), tmp_path, train_fn=train, progress=False)
    assert calls == [("baseline-s0", True), ("baseline-s2", True)]
    assert [(r.status, r.holder) for r in results] == [
        ("completed", None), ("running", "another-host:4242"), ("completed", None)]
    assert read_lock(tmp_path / "baseline-s1").owner == ELSEWHERE  # untouched


def test_a_run_whose_holder_went_silent_is_taken_over_and_resumed(tmp_path):
    leave_lock(tmp_path / "baseline-s0", ELSEWHERE, heartbeat_age=30)
    train, calls = fake_train()
    results = run_sweep(seeds(0), tmp_path, train_fn=train, progress=False, lock_timeout_s=10)
    assert calls == [("baseline-s0", True)] and results[0].status == "completed"
    lock = read_lock(tmp_path / "baseline-s0")
    assert lock.number == 1 and lock.owner == Owner.this_process() and lock.released is not None


def test_every_run_s_lock_is_released_however_it_ends(tmp_path):
    train, _ = fake_train()
    results = run_sweep(seeds(0, 9), tmp_path, train_fn=train, progress=False)
    assert [r.status for r in results] == ["completed", "failed"]
    assert all(read_lock(tmp_path / r.name).state(600) == "released" for r in results)


def test_a_run_another_worker_ended_as_failed_during_this_sweep_is_not_retried_but_an_older_failure_is(tmp_path):
    train, calls = fake_train()
    run_sweep(seeds(9), tmp_path, train_fn=train, progress=False)  # an earlier sweep: the run failed
    leave_lock(tmp_path / "baseline-s8", ELSEWHERE)  # held while this sweep starts, then ended as failed
    started = time.time()

    def other_worker_fails_it(cfg, run_dir, progress=True, resume=False):
        if run_dir.name == "baseline-s0":  # meanwhile, the other worker ends its run as failed
            other = tmp_path / "baseline-s8"
            RunWriter(other).write_config(BASE.replace(seed=8).to_dict())
            RunWriter(other).write_summary({"status": "failed", "error": "RuntimeError: boom"})
            lock = json.loads((other / "lock.0.json").read_text())
            (other / "lock.0.json").write_text(json.dumps({**lock, "released": time.time()}))
        return train(cfg, run_dir, progress, resume)

    results = run_sweep(seeds(9, 0, 8), tmp_path, train_fn=other_worker_fails_it, progress=False)
    assert [name for name, _ in calls] == ["baseline-s9", "baseline-s9", "baseline-s0"]  # s8: not again
    assert [r.status for r in results] == ["failed", "completed", "failed"]
    ended = read_lock(tmp_path / "baseline-s8")
    assert ended.owner == ELSEWHERE and ended.released > started


def test_a_sweep_writes_its_run_names_so_status_can_show_pending_runs(tmp_path):
    train, _ = fake_train()
    run_sweep(seeds(0, 1), tmp_path, train_fn=train, progress=False)
    run_sweep(seeds(1, 2), tmp_path, train_fn=train, progress=False)
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"] == ["baseline-s0", "baseline-s1", "baseline-s2"]


# ------------------------------------------------------------------------------------------ workers that disagree


def test_a_worker_whose_settings_differ_from_the_sweep_s_is_refused_before_any_work(tmp_path):
    train, calls = fake_train()
    run_sweep(seeds(0, 1), tmp_path, train_fn=train, progress=False)
    manifest = (tmp_path / "sweep.json").read_text()
    other = [cfg.replace(lr=0.004, warmup_steps=5) for cfg in seeds(2, 3)]
    with pytest.raises(ConfigError) as exc:
        run_sweep(other, tmp_path, train_fn=train, progress=False)
    message = str(exc.value)
    assert "\n" not in message and "--lr: 0.004 vs 0.002" in message and "--warmup-steps: 5 vs 100" in message
    assert "another --out" in message
    assert [name for name, _ in calls] == ["baseline-s0", "baseline-s1"]  # nothing more trained
    assert not (tmp_path / "baseline-s2").exists() and (tmp_path / "sweep.json").read_text() == manifest


def test_workers_on_one_sweep_may_differ_in_grid_values_arms_length_and_bookkeeping(tmp_path):
    train, _ = fake_train()
    run_sweep(seeds(0, 1), tmp_path, train_fn=train, progress=False)
    more = [  # other seeds; filtered arms beside the baseline; a longer run; checkpoints and cache elsewhere
        seeds(2, 3),
        expand_grid(BASE.replace(grokfast=True), {"seed": [0, 1], "alpha": [0.8, 0.9]}, grokfast=True, baseline=True),
        expand_grid(BASE.replace(optimizer="grokadamw"), {"seed": [0]}, grokfast=False, baseline=True),
        expand_grid(BASE.replace(optimizer="muon"), {"seed": [0]}, grokfast=False, baseline=True),
        [cfg.replace(epochs=2.0, checkpoint_every=0.5, keep_checkpoints=5, data_cache="elsewhere")
         for cfg in seeds(4)],
    ]
    for configs in more:
        assert {r.status for r in run_sweep(configs, tmp_path, train_fn=train, progress=False)} == {"completed"}
    # An lr grid names lr in its folders, so its runs cannot be mistaken for the single-lr runs beside them.
    lrs = expand_grid(BASE, {"seed": [0], "lr": [0.001, 0.003]}, grokfast=False, baseline=True)
    done = run_sweep(lrs, tmp_path, vary=["lr"], train_fn=train, progress=False)
    assert [(r.name, r.status) for r in done] == [("baseline-lr0.001-s0", "completed"),
                                                  ("baseline-lr0.003-s0", "completed")]
    assert len(json.loads((tmp_path / "sweep.json").read_text())["runs"]) == 13
    with pytest.raises(ConfigError, match=r"--muon-lr: 0\.01 vs 0\.02"):  # the muon arm's own settings agree, too
        run_sweep([BASE.replace(optimizer="muon", muon_lr=0.01, seed=5)], tmp_path, train_fn=train, progress=False)


def test_a_run_another_worker_finished_with_other_settings_is_refused_not_counted_as_done(tmp_path):
    train, calls = fake_train()

    def meanwhile_another_worker_completes_s1(cfg, run_dir, progress=True, resume=False):
        other = RunWriter(tmp_path / "baseline-s1")  # e.g. from an older sweep.json, which recorded no settings
        other.write_config(BASE.replace(seed=1, lr=0.004).to_dict())
        other.write_summary({"status": "completed", "best_val_loss": 2.0})
        return train(cfg, run_dir, progress, resume)

    with pytest.raises(ConfigError, match=r"baseline-s1 was trained with other settings .*--lr: 0\.002 vs 0\.004"):
        run_sweep(seeds(0, 1), tmp_path, train_fn=meanwhile_another_worker_completes_s1, progress=False)
    assert [name for name, _ in calls] == ["baseline-s0"]


def test_a_takeover_of_a_run_that_went_past_this_worker_s_length_is_refused_and_the_run_left_as_it_is(tmp_path):
    train, calls = fake_train()
    short = [cfg.replace(max_steps=30) for cfg in seeds(1, 0)]
    gone = Owner(socket.gethostname(), dead_pid())

    def meanwhile_another_worker_dies_at_step_38(cfg, run_dir, progress=True, resume=False):
        other = tmp_path / "baseline-s0"  # a longer run's worker, killed after its step-38 evaluation
        RunWriter(other).write_config({**BASE.replace(max_steps=60).to_dict(), "train_tokens": 1_290_590})
        RunWriter(other).append_metrics({"epoch": 0.004, "step": 38, "tokens": 4864, "train_loss": 2.0,
                                         "val_loss": 2.5, "lr": 0.1, "grad_norm": 1.0, "ema_ratio": None,
                                         "time_s": 0.1, "tokens_per_s": 10.0})
        leave_lock(other, gone)
        return train(cfg, run_dir, progress, resume)

    with pytest.raises(ConfigError, match=r"baseline-s0 already went to step 38 .*past the 30 steps of --max-steps 30"):
        run_sweep(short, tmp_path, train_fn=meanwhile_another_worker_dies_at_step_38, progress=False)
    assert [name for name, _ in calls] == ["baseline-s1"]
    run = read_run(tmp_path / "baseline-s0")
    assert run.summary is None and run.config["max_steps"] == 60 and [r["step"] for r in run.metrics] == [38]


def test_workers_adding_their_runs_to_the_manifest_at_once_lose_none(tmp_path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom hlb_gpt.status import write_manifest\n"
            "i, start = sys.argv[1], float(sys.argv[2])\ntime.sleep(max(0.0, start - time.time()))\n"
            "for j in range(15):\n    write_manifest(Path(sys.argv[3]), [f'w{i}-{j}'])\n")
    start = time.time() + 3  # every process has imported by then, and they write at once
    writers = [subprocess.Popen([sys.executable, "-c", code, str(i), str(start), str(tmp_path)]) for i in range(6)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 6
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert sorted(runs) == sorted(f"w{i}-{j}" for i in range(6) for j in range(15))


@pytest.mark.slow
def test_a_run_whose_lock_is_taken_over_stops_before_its_next_write_and_the_sweep_goes_on(tmp_path, monkeypatch,
                                                                                          caplog):
    from tiny_runs import TINY_LM

    original = RunWriter.append_metrics

    def taken_over_after_step_10(self, row):  # another host takes the run after this row (the heartbeat is late)
        original(self, row)
        if row["step"] >= 10 and self.run_dir.name == "baseline-s0" and not (self.run_dir / "lock.1.json").exists():
            beat = time.time()
            (self.run_dir / "lock.1.json").write_text(json.dumps(
                {"host": ELSEWHERE.host, "pid": ELSEWHERE.pid, "started": beat, "heartbeat": beat, "released": None}))

    monkeypatch.setattr(RunWriter, "append_metrics", taken_over_after_step_10)
    cfg = RunConfig(**{**TINY_LM, "max_steps": 40, "evals_per_epoch": 2000, "checkpoint_every": 0.0005},
                    data_cache=str(tmp_path / "cache"))
    results = run_sweep([cfg, cfg.replace(seed=1)], tmp_path / "sweep", progress=False)
    assert [(r.status, r.holder) for r in results] == [("running", str(ELSEWHERE)), ("completed", None)]
    run_dir = tmp_path / "sweep" / "baseline-s0"
    run = read_run(run_dir)
    steps = [r["step"] for r in run.metrics]
    assert run.summary is None and steps[-1] >= 10 and [s for s in steps if s >= 10] == [steps[-1]]
    assert all(int(p.stem.rpartition("-")[2]) <= steps[-1] for p in list_checkpoints(run_dir))
    assert json.loads((run_dir / "lock.0.json").read_text())["released"] is None  # not even its lock is written
    lost = [r.getMessage() for r in caplog.records if "taken over by" in r.getMessage()]
    assert lost == [f"[1/2] baseline-s0: taken over by {ELSEWHERE}, to which this process's lock looked stale; "
                    "this process stopped writing to the run"]


# ------------------------------------------------------------------------------------------ status and exit codes


def status(out):
    from hlb_gpt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["status", str(out), "--lock-timeout", "60"])
    assert exc.value.code == 0


def test_status_prints_one_line_per_run_with_its_state_epochs_and_last_val_loss(tmp_path, capsys):
    train, _ = fake_train()
    run_sweep(seeds(0, 9), tmp_path, train_fn=train, progress=False)
    from hlb_gpt.status import write_manifest

    write_manifest(tmp_path, ["baseline-s0", "baseline-s9", "baseline-s2", "baseline-s3", "baseline-s4"])
    leave_lock(tmp_path / "baseline-s2", ELSEWHERE)
    leave_lock(tmp_path / "baseline-s3", ELSEWHERE, heartbeat_age=600)
    status(tmp_path)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert list(rows) == ["baseline-s0", "baseline-s9", "baseline-s2", "baseline-s3", "baseline-s4"]
    assert re.search(r"completed\s+1\s+2\.5000$", rows["baseline-s0"])
    assert re.search(r"failed\s+1\s+2\.5000$", rows["baseline-s9"])
    assert "running on another-host:4242" in rows["baseline-s2"]
    assert "stale lock (another-host:4242, heartbeat 10m ago)" in rows["baseline-s3"]
    assert re.search(r"pending\s+-\s+-$", rows["baseline-s4"])
    assert lines[-1] == "5 runs: 1 completed, 1 failed, 1 running, 1 stale lock, 1 pending"


def test_status_does_not_import_torch(tmp_path):
    train, _ = fake_train()
    run_sweep(seeds(0), tmp_path, train_fn=train, progress=False)
    code = ("import sys\nfrom hlb_gpt.cli import main\ntry:\n    main(['status', sys.argv[1]])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "baseline-s0" in res.stdout and "completed" in res.stdout


def test_a_worker_whose_runs_are_all_held_elsewhere_exits_0_and_says_where_they_run(tmp_path):
    leave_lock(tmp_path / "sweep" / "baseline-s0", ELSEWHERE)
    res = hlb(SMALL + ["--out", str(tmp_path / "sweep"), "--data-cache", str(tmp_path / "cache"), "--max-steps", "2"])
    assert res.returncode == 0, res.stderr
    assert "baseline-s0: running on another-host:4242" in res.stdout
    assert not (tmp_path / "sweep" / "baseline-s0" / "config.json").exists()


@pytest.mark.parametrize("value", ["0", "ten minutes", "-1m"])
def test_a_lock_timeout_that_is_not_a_duration_is_bad_input(tmp_path, capsys, value):
    from hlb_gpt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(SMALL + ["--lock-timeout", value, "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("Error: Invalid value for '--lock-timeout'")
    assert not (tmp_path / "sweep").exists()


def test_resume_refuses_a_run_another_process_is_training(tmp_path, capsys):
    from hlb_gpt.cli import main

    train, _ = fake_train()
    run_sweep(seeds(0), tmp_path, train_fn=train, progress=False)
    run_dir = tmp_path / "baseline-s0"
    for p in run_dir.glob("lock.*.json"):
        p.unlink()
    leave_lock(run_dir, ELSEWHERE)
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip() == f"Error: --resume {run_dir}: the run is being trained by " \
                                                 "another-host:4242"


# ------------------------------------------------------------------------------------------ temporary files


def test_writers_of_the_same_file_at_once_never_share_a_temporary_file(tmp_path):
    path, errors = tmp_path / "summary.json", []

    def write(i):
        try:
            for j in range(200):
                atomic_write_text(path, f"{i} {j}\n" * 100)
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(path.read_text().splitlines())) == 1  # one writer's whole text
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "config.json", "{}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ real workers


def start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "hlb_gpt", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_three_workers_on_one_sweep_train_each_run_exactly_once(tmp_path):
    args = SMALL + ["--seed", "0,1,2,3,4,5", "--epochs", "0.03", "--evals-per-epoch", "1000",
                    "--checkpoint-every", "0.01", "--data-cache", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "sweep")]
    workers = [start(args, WORKER_ENV) for _ in range(3)]  # the cache is built by all three at once, too
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err
    names = [f"baseline-s{s}" for s in range(6)]
    trained_by, step_lists = {}, []
    for name in names:
        run_dir = tmp_path / "sweep" / name
        run = read_run(run_dir)
        assert run.status == "completed"
        steps = [row["step"] for row in run.metrics]
        assert steps == sorted(set(steps)) and steps[-1] == run.summary["steps"]  # no step twice, up to the end
        step_lists.append(steps)
        assert [p.name for p in run_dir.glob("lock.*.json")] == ["lock.0.json"]  # claimed once, never taken over
        trained_by[name] = read_lock(run_dir).owner.pid
        started = [err.count(f"{name}: 22,849 parameters") for _, err in outputs]
        assert sorted(started) == [0, 0, 1]  # one process trained it, once
        assert started[[w.pid for w in workers].index(trained_by[name])] == 1
    assert all(steps == step_lists[0] for steps in step_lists)  # every run logged the same steps as the others
    assert set(trained_by.values()) == {w.pid for w in workers}  # every worker trained at least one run
    for w, (out, _) in zip(workers, outputs):  # each reports every run: completed, or still running in another
        others = {f"running on {socket.gethostname()}:{v.pid}" for v in workers if v is not w}
        for name in names:
            line = next(line for line in out.splitlines() if line.startswith(f"{name}: "))
            assert line.startswith(f"{name}: completed") or line.split(": ", 1)[1] in others, line


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    args = SMALL + KILL_ARGS + ["--data-cache", str(tmp / "cache"), "--out", str(tmp / "sweep")]
    res = hlb(args, env=WORKER_ENV)
    assert res.returncode == 0, res.stderr
    return numbers(tmp / "sweep" / "baseline-s0")


KILL_ARGS = ["--epochs", "0.01", "--evals-per-epoch", "2000", "--checkpoint-every", "0.002"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["its process is dead", "its heartbeat timed out"])
def test_a_killed_worker_s_run_is_taken_over_by_another_and_ends_as_if_never_killed(tmp_path, uninterrupted, how):
    timeout = 2.0 if how == "its process is dead" else 15.0  # long enough to see the run left to its holder first
    args = SMALL + KILL_ARGS + ["--lock-timeout", f"{timeout}s", "--data-cache", str(tmp_path / "cache"),
                                "--out", str(tmp_path / "sweep")]
    run_dir = tmp_path / "sweep" / "baseline-s0"
    killed = start(args, WORKER_ENV)
    deadline = time.monotonic() + 300
    while not (list_checkpoints(run_dir) and (run_dir / "metrics.jsonl").exists() and read_run(run_dir).metrics):
        assert killed.poll() is None and time.monotonic() < deadline, "the worker ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert read_run(run_dir).summary is None and read_lock(run_dir).released is None
    if how == "its heartbeat timed out":  # as if the worker ran on another machine: its PID says nothing here
        lock = json.loads((run_dir / "lock.0.json").read_text())
        (run_dir / "lock.0.json").write_text(json.dumps({**lock, "host": "another-host"}))
        early = hlb(args, env=WORKER_ENV)  # before the timeout the run is left to its (silent) holder
        assert early.returncode == 0 and f"baseline-s0: running on another-host:{killed.pid}" in early.stdout
        while read_lock(run_dir).heartbeat_age() <= timeout:
            time.sleep(0.1)
    taker = start(args, WORKER_ENV)
    out, err = taker.communicate(timeout=600)
    assert taker.returncode == 0, err
    assert "took over the stale lock" in err and "resumed at step" in err
    assert read_run(run_dir).status == "completed"
    assert read_lock(run_dir).number == 1 and read_lock(run_dir).owner.pid == taker.pid
    assert numbers(run_dir) == uninterrupted


# ------------------------------------------------------------------------------------------ real workers that disagree


def wait_for(condition, proc, what, seconds=300):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the worker ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def last_checkpoint_step(run_dir):
    found = list_checkpoints(run_dir)
    return int(found[-1].stem.rpartition("-")[2]) if found else -1


@pytest.mark.slow
def test_two_workers_started_together_with_different_settings_one_is_refused_before_any_work(tmp_path):
    args = SMALL + ["--seed", "0,1", "--max-steps", "20", "--data-cache", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "sweep")]
    hlb(SMALL + ["--max-steps", "1", "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "warm")],
        env=WORKER_ENV)  # the data cache first, so that the two start at the same pace
    workers = [start(args, WORKER_ENV), start(args + ["--lr", "0.004"], WORKER_ENV)]
    outputs = [w.communicate(timeout=600) for w in workers]
    codes = sorted(w.returncode for w in workers)
    assert codes == [0, 2], outputs
    refused = [w.returncode for w in workers].index(2)
    err = outputs[refused][1].strip().splitlines()
    # Which check says it depends on the race: the sweep's recorded settings, or a run folder the other worker
    # has already begun; either way one line naming the setting, and no work.
    assert len(err) == 1 and err[0].startswith("Error: ") and re.search(r"--lr: 0\.00[24] vs 0\.00[24]", err[0])
    lr = 0.004 if refused == 0 else 0.002  # the other worker's
    for name in ("baseline-s0", "baseline-s1"):
        run = read_run(tmp_path / "sweep" / name)
        assert run.status == "completed" and run.config["lr"] == lr
        assert read_lock(tmp_path / "sweep" / name).owner.pid == workers[1 - refused].pid


@pytest.mark.slow
def test_workers_started_together_on_other_seeds_both_list_their_runs_in_the_manifest(tmp_path):
    common = SMALL + ["--max-steps", "2", "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "sweep")]
    hlb(SMALL + ["--max-steps", "1", "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "warm")],
        env=WORKER_ENV)
    workers = [start(common + ["--seed", "0,1"], WORKER_ENV), start(common + ["--seed", "2,3"], WORKER_ENV)]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()
    assert sorted(json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]) == [
        f"baseline-s{s}" for s in range(4)]


@pytest.mark.slow
def test_a_worker_that_would_take_over_a_run_past_its_own_length_is_refused_and_leaves_it_as_it_is(tmp_path):
    common = SMALL + ["--evals-per-epoch", "1000", "--checkpoint-every", "0.001", "--data-cache",
                      str(tmp_path / "cache"), "--out", str(tmp_path / "sweep")]
    short = start(common + ["--seed", "1,0", "--max-steps", "30"], WORKER_ENV)
    long = None
    try:
        # The short worker checks the sweep folder and claims s1; paused there, it will look at s0 later.
        wait_for(lambda: (tmp_path / "sweep" / "baseline-s1" / "lock.0.json").exists(), short, "claiming s1")
        short.send_signal(signal.SIGSTOP)
        run_dir = tmp_path / "sweep" / "baseline-s0"
        long = start(common + ["--seed", "0", "--max-steps", "3000"], WORKER_ENV)
        wait_for(lambda: last_checkpoint_step(run_dir) > 30, long, "a checkpoint past step 30")
        long.send_signal(signal.SIGKILL)
        long.wait()
    finally:
        short.send_signal(signal.SIGCONT)
        if long is not None and long.poll() is None:
            long.kill()
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith("lock.")}
    out, err = short.communicate(timeout=600)
    assert short.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("Error: ") and "past the 30 steps of --max-steps 30" in err
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and not p.name.startswith("lock.")} == before
    assert read_run(run_dir).summary is None and read_run(run_dir).config["max_steps"] == 3000
    assert read_run(tmp_path / "sweep" / "baseline-s1").status == "completed"


@pytest.mark.slow
def test_a_paused_worker_on_this_host_keeps_its_run_however_old_its_heartbeat(tmp_path, uninterrupted):
    args = SMALL + KILL_ARGS + ["--lock-timeout", "2s", "--data-cache", str(tmp_path / "cache"),
                                "--out", str(tmp_path / "sweep")]
    run_dir = tmp_path / "sweep" / "baseline-s0"
    paused = start(args, WORKER_ENV)
    try:
        wait_for(lambda: list_checkpoints(run_dir), paused, "its first checkpoint")
        paused.send_signal(signal.SIGSTOP)
        time.sleep(3)  # its heartbeat is older than --lock-timeout now
        other = hlb(args, env=WORKER_ENV)
    finally:
        paused.send_signal(signal.SIGCONT)
    assert other.returncode == 0, other.stderr
    assert f"baseline-s0: running on {socket.gethostname()}:{paused.pid}" in other.stdout
    out, err = paused.communicate(timeout=600)
    assert paused.returncode == 0, err
    assert [p.name for p in run_dir.glob("lock.*.json")] == ["lock.0.json"]
    assert read_run(run_dir).status == "completed" and numbers(run_dir) == uninterrupted


@pytest.mark.slow
def test_a_paused_worker_whose_run_was_taken_over_stops_writing_to_it_and_goes_on(tmp_path, uninterrupted):
    args = SMALL + KILL_ARGS + ["--lock-timeout", "2s", "--data-cache", str(tmp_path / "cache"),
                                "--out", str(tmp_path / "sweep")]
    run_dir = tmp_path / "sweep" / "baseline-s0"
    paused = start(args, WORKER_ENV)
    taker = None
    try:
        wait_for(lambda: list_checkpoints(run_dir), paused, "its first checkpoint")
        paused.send_signal(signal.SIGSTOP)
        # As if it ran on another machine, which the other worker cannot ask whether the process lives.
        lock = json.loads((run_dir / "lock.0.json").read_text())
        (run_dir / "lock.0.json").write_text(json.dumps({**lock, "host": "another-host"}))
        while read_lock(run_dir).heartbeat_age() <= 2:
            time.sleep(0.1)
        taker = start(args, WORKER_ENV)
        wait_for(lambda: (run_dir / "lock.1.json").exists(), taker, "the takeover")
    finally:
        paused.send_signal(signal.SIGCONT)  # it wakes while the other trains the run (or after)
    out, err = paused.communicate(timeout=600)
    taker_out, taker_err = taker.communicate(timeout=600)
    assert taker.returncode == 0 and "took over the stale lock" in taker_err, taker_err
    assert paused.returncode == 0, err
    assert read_run(run_dir).status == "completed" and numbers(run_dir) == uninterrupted  # the taker's rows alone
    lost = [line for line in err.splitlines() if "taken over by" in line]
    assert lost == [f"[1/1] baseline-s0: taken over by {socket.gethostname()}:{taker.pid}, to which this process's "
                    "lock looked stale; this process stopped writing to the run"]
    assert read_lock(run_dir).owner.pid == taker.pid and read_lock(run_dir).released is not None
    assert json.loads((run_dir / "lock.0.json").read_text())["host"] == "another-host"  # not written since
