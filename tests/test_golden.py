"""Golden loss curves: a tiny seeded run, with and without Grokfast, must keep training exactly as recorded.

A change that alters the model, data order, optimizer, schedule or filter moves these numbers. If the change
is intended, regenerate with `python tests/test_golden.py` and say why in the commit.
"""

import json
import sys
import tempfile
from pathlib import Path

import pytest

from hlb_gpt.config import RunConfig
from hlb_gpt.records import read_run
from hlb_gpt.train import train

GOLDEN = Path(__file__).with_name("golden_curves.json")
RUNS = {
    "baseline": {},
    "ema-a0.9-g2": {"grokfast": True, "alpha": 0.9, "gain": 2.0},
    "ma-w4-g1": {"grokfast": True, "filter": "ma", "window": 4, "gain": 1.0},
}


def curve(name: str, cache: Path, out: Path) -> dict[str, list[float]]:
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=2, width=64, seq_len=64, batch_size=8,
                    epochs=0.006, evals_per_epoch=500, eval_tokens=4096, data_cache=str(cache), **RUNS[name])
    train(cfg, out, progress=False)
    rows = [row for row in read_run(out).metrics if row["step"] > 0]  # the curves predate the step-0 evaluation
    return {key: [row[key] for row in rows] for key in ("step", "train_loss", "val_loss", "grad_norm")}


@pytest.mark.parametrize("name", list(RUNS))
def test_tiny_seeded_run_follows_its_golden_curve(name, tmp_path):
    golden = json.loads(GOLDEN.read_text())[name]
    got = curve(name, tmp_path / "cache", tmp_path / name)
    assert got["step"] == golden["step"]
    for key in ("train_loss", "val_loss", "grad_norm"):
        assert got[key] == pytest.approx(golden[key], rel=1e-4), key


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        curves = {name: curve(name, Path(tmp) / "cache", Path(tmp) / name) for name in RUNS}
    GOLDEN.write_text(json.dumps(curves, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
