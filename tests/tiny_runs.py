"""Runs small enough to train inside a test: a few steps of a one-block model on the bundled `mini` text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hlb_gpt.config import RunConfig

TINY = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes"]  # the same as flags of `hlb-gpt`
TINY_LM = dict(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=16, seq_len=32, batch_size=4,
               eval_tokens=1024, max_steps=5, device="cpu")


def run_main(args: list[str], capsys: Any) -> tuple[int, str, str]:
    """Run `hlb-gpt ARGS` in this process: its exit code, stdout and stderr."""
    import pytest

    from hlb_gpt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def bench_fixture(name: str) -> Any:
    """A module-scoped fixture giving `bench/<name>.py` as a module (the benchmarks are scripts, not a package),
    registered in sys.modules while the tests use it, since its dataclasses look their module up there."""
    import importlib.util
    import sys

    import pytest

    @pytest.fixture(scope="module")
    def bench() -> Any:
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        yield module
        del sys.modules[spec.name]

    return bench


def train_tiny(run_dir: Path, cache: Path, **changes: Any) -> Path:
    """Train a tiny language-model run (or, with task="modular", a grokking run) into `run_dir`; return it."""
    from hlb_gpt.train import train

    if changes.get("task") == "modular":
        cfg = RunConfig(task="modular", depth=1, width=32, max_steps=2, device="cpu")
        train(cfg.replace(**changes), run_dir, progress=False)
        return run_dir
    cfg = RunConfig(**TINY_LM, data_cache=str(cache)).replace(**changes)
    summary = train(cfg, run_dir, progress=False)
    assert summary["status"] == "completed", summary
    return run_dir
