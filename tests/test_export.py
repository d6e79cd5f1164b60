import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from hlb_gpt.checkpoint import latest_checkpoint, load_checkpoint
from hlb_gpt.export import FORMAT, write_safetensors
from hlb_gpt.model import GPT, GPTConfig
from hlb_gpt.records import read_run
from hlb_gpt.trained import load_trained
from tiny_runs import run_main, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return train_tiny(root / "run", root / "cache", gate="sigmoid")


def test_the_file_holds_the_checkpoint_s_weights_and_the_run_s_config(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    code, stdout, err = run_main(["export", str(run), "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout == f"wrote {out}: step-000000005.pt (step 5, run completed)\n"
    weights = load_file(out)
    saved = load_checkpoint(latest_checkpoint(run))["model"]
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["tokenizer"] == "bytes" and meta["vocab_size"] == "256"
    assert meta["step"] == "5"
    assert json.loads(meta["config"]) == read_run(run).config
    # No torch needed to read it: the numpy reader gives the same numbers.
    assert np.array_equal(load_numpy(out)["head.weight"], saved["head.weight"].numpy())


def test_a_model_rebuilt_from_the_file_alone_gives_the_run_s_logits(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert run_main(["export", str(run), "--out", str(out)], capsys)[0] == 0
    with safe_open(out, framework="pt") as f:
        config = GPTConfig(**json.loads(f.metadata()["gpt_config"]))
    rebuilt = GPT(config)
    rebuilt.load_state_dict(load_file(out))
    assert config.gate == "sigmoid" and config.depth == 1 and config.max_seq_len == 32
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(idx), load_trained(run).model(idx))


def test_an_existing_file_is_kept_unless_force(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    code, stdout, err = run_main(["export", str(run), "--out", str(out)], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "pass --force" in err
    assert out.read_bytes() == b"keep me"
    assert run_main(["export", str(run), "--out", str(out), "--force"], capsys)[0] == 0
    assert "head.weight" in load_file(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_a_folder_as_out_is_refused_in_one_line(run, tmp_path, capsys):
    for force in ([], ["--force"]):
        code, _, err = run_main(["export", str(run), "--out", str(tmp_path), *force], capsys)
        assert code == 2 and err.count("\n") == 1 and "is a folder" in err


def test_a_run_without_a_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", tmp_path / "cache", max_steps=1, checkpoint_every=0)
    code, _, err = run_main(["export", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and err.count("\n") == 1 and "has no checkpoint" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_a_modular_run_is_refused_in_one_line(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", tmp_path / "cache", task="modular")
    code, _, err = run_main(["export", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a --task modular run" in err


def test_another_run_s_checkpoint_is_refused_in_one_line_and_nothing_is_written(run, tmp_path, capsys):
    other = train_tiny(tmp_path / "other", tmp_path / "cache", gate="sigmoid", seed=3)  # same architecture
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_main(["export", str(run), "--out", str(out), "--checkpoint",
                                  str(latest_checkpoint(other))], capsys)
    assert "Traceback" not in err and code == 2 and stdout == "" and err.count("\n") == 1, err
    assert f"is not a checkpoint of {run}" in err and "--seed: 3 vs 0" in err
    assert not out.exists()


def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line(run, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_main(["export", str(run), "--out", str(out), "--checkpoint", str(run / "config.json")],
                                 capsys)
    assert "Traceback" not in err and code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "config.json is not a checkpoint" in err and "Please file an issue" not in err
    assert not out.exists()


def test_tied_or_overlapping_tensors_are_written_as_separate_copies(tmp_path):
    # safetensors refuses tensors that share memory; tied weights and views of one buffer must still export.
    buffer = torch.arange(12.0)
    tied = torch.ones(3, 4)
    state = {"embed.weight": tied, "head.weight": tied, "first": buffer[:6], "second": buffer[6:].view(2, 3)}
    out = write_safetensors(state, {"format": FORMAT}, tmp_path / "tied.safetensors")
    loaded = load_file(out)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_the_file_is_readable_by_others_as_any_new_file(tmp_path):
    # safetensors' own save_file makes owner-only files; an export is made to be shared.
    out = write_safetensors({"w": torch.ones(2)}, {"format": FORMAT}, tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_lora_fine_tune_exports_as_a_plain_model_with_its_adapters_merged(run, tmp_path, capsys):
    tuned = train_tiny(tmp_path / "tuned", tmp_path / "cache", gate="sigmoid", init_from=str(run), lora_rank=2,
                       max_steps=2)
    out = tmp_path / "tuned.safetensors"
    assert run_main(["export", str(tuned), "--out", str(out)], capsys)[0] == 0
    weights = load_file(out)
    assert weights.keys() == load_trained(run).model.state_dict().keys()  # no adapter names
    adapted = load_checkpoint(latest_checkpoint(tuned))["model"]
    A, B = adapted["blocks.0.parametrizations.expand.0.lora_A"], adapted["blocks.0.parametrizations.expand.0.lora_B"]
    base = adapted["blocks.0.parametrizations.expand.original"]
    assert torch.allclose(weights["blocks.0.expand"], base + 16.0 / 2 * B @ A)
    assert not torch.equal(weights["blocks.0.expand"], base)  # two steps moved B off zero
