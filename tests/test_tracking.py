import subprocess
import sys

import pytest

from hlb_gpt.config import RunConfig
from hlb_gpt.records import read_run
from hlb_gpt.train import train


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
