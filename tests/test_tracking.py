import subprocess
import sys

import pytest

from hlb_gpt.config import RunConfig
from hlb_gpt.records import read_run
from hlb_gpt.tracking import WANDB_RUN_ID, wandb_run_id
from hlb_gpt.train import train

from tiny_runs import TINY_LM


def wandb_run_id_of(run_dir):
    return (run_dir / WANDB_RUN_ID).read_text()


def test_training_without_wandb_never_imports_it(tmp_path):
    code = (
        "import sys\n"
        "from hlb_gpt.cli import main\n"
        "try:\n"
        f"    main(['--dataset', 'mini', '--preset', 'tiny', '--tokenizer', 'bytes', '--depth', '1', '--width', '32',"
        f" '--seq-len', '32', '--batch-size', '4', '--epochs', '0.0005', '--eval-tokens', '1024', '-q',"
        f" '--out', {str(tmp_path / 'sweep')!r}, '--data-cache', {str(tmp_path / 'cache')!r}])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert read_run(tmp_path / "sweep" / "baseline-s0").status == "completed"


@pytest.mark.slow
def test_wandb_offline_run_writes_its_local_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", data_cache=str(tmp_path / "cache"), depth=1,
                    width=32, seq_len=32, batch_size=4, epochs=0.001, evals_per_epoch=2000, eval_tokens=1024,
                    wandb=True, wandb_project="hlb-gpt-test")
    summary = train(cfg, tmp_path / "sweep" / "baseline-s0", progress=False)
    assert summary["status"] == "completed"
    offline = list((tmp_path / "sweep" / "baseline-s0" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert any(offline[0].glob("*.wandb"))


def offline_run_ids(run_dir):
    """The wandb run id of each offline run under the run folder (`offline-run-<time>-<id>[-<n>]`)."""
    return [p.name.split("-")[3] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


@pytest.mark.slow
def test_a_run_extended_from_its_checkpoint_logs_to_the_wandb_run_it_started(tmp_path, offline_wandb):
    cfg = RunConfig(**TINY_LM, data_cache=str(tmp_path / "cache"), checkpoint_every=1, wandb=True,
                    wandb_project="hlb-gpt-test").replace(max_steps=3)
    run_dir = tmp_path / "sweep" / "baseline-s0"
    train(cfg, run_dir, progress=False)
    summary = train(cfg.replace(max_steps=5), run_dir, progress=False, resume=True)
    assert summary["status"] == "completed" and summary["steps"] == 5
    ids = offline_run_ids(run_dir)
    assert len(ids) == 2 and ids[0] == ids[1] == wandb_run_id_of(run_dir)


@pytest.mark.slow
def test_two_runs_in_one_process_log_to_two_wandb_runs(tmp_path, offline_wandb):
    cfg = RunConfig(**TINY_LM, data_cache=str(tmp_path / "cache"), checkpoint_every=0, wandb=True,
                    wandb_project="hlb-gpt-test").replace(max_steps=2)
    for seed in (0, 1):
        train(cfg.replace(seed=seed), tmp_path / "sweep" / f"baseline-s{seed}", progress=False)
    first, second = (offline_run_ids(tmp_path / "sweep" / f"baseline-s{seed}") for seed in (0, 1))
    assert len(first) == len(second) == 1 and first != second


def test_a_folder_keeps_its_wandb_run_id_when_it_continues_and_gets_a_new_one_when_it_starts_over(tmp_path):
    started = wandb_run_id(tmp_path, resumed=False)
    assert wandb_run_id(tmp_path, resumed=True) == started == wandb_run_id_of(tmp_path)
    # Trained again from its first step: the old wandb run already holds rows at those steps.
    again = wandb_run_id(tmp_path, resumed=False)
    assert again != started and wandb_run_id(tmp_path, resumed=True) == again
    # A folder resumed from a checkpoint written before it had an id (or without --wandb then) gets one now.
    assert wandb_run_id(tmp_path / "older", resumed=True) == wandb_run_id_of(tmp_path / "older")
