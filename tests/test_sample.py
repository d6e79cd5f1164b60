import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hlb_gpt.checkpoint import latest_checkpoint, load_checkpoint
from hlb_gpt.sample import generate
from hlb_gpt.trained import load_trained
from tiny_runs import run_main, train_tiny


@pytest.fixture(scope="module")
def bytes_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bytes")
    return train_tiny(root / "run", root / "cache")


class Counter(nn.Module):
    """A stand-in model that is sure the next id is the last one plus 1; it records the lengths it was given."""

    def __init__(self, vocab: int, max_seq_len: int):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.vocab, self.lengths = vocab, []

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        return 10.0 * nn.functional.one_hot((idx + 1) % self.vocab, self.vocab).float()


# ------------------------------------------------------------------------------------------ generate


def test_generate_appends_n_ids_after_the_prompt():
    out = generate(Counter(10, 8), torch.tensor([[3, 4]]), 5, temperature=0)
    assert out.tolist() == [[3, 4, 5, 6, 7, 8, 9]]


def test_the_model_sees_at_most_its_max_seq_len_latest_ids():
    model = Counter(100, 4)
    out = generate(model, torch.arange(6)[None], 5, temperature=0)
    assert max(model.lengths) == 4 and out[0, -5:].tolist() == [6, 7, 8, 9, 10]


def test_draws_stay_below_the_tokenizer_vocabulary():
    model = Counter(16, 8)  # after id 11 it wants 12: a padded row past a vocabulary of 12
    out = generate(model, torch.tensor([[11]]), 20, temperature=1.0, generator=torch.Generator().manual_seed(0),
                   n_vocab=12)
    assert out.max().item() < 12


def test_top_k_1_draws_what_temperature_0_picks(bytes_run):
    model = load_trained(bytes_run).model
    idx = torch.tensor([[84, 104, 101, 32]])  # "The "
    greedy = generate(model, idx, 40, temperature=0)
    for seed in (0, 1):
        drawn = generate(model, idx, 40, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(drawn, greedy)


def test_temperature_0_is_the_argmax_at_every_step(bytes_run):
    model = load_trained(bytes_run).model
    idx = torch.tensor([[10]])
    out = generate(model, idx, 50, temperature=0)  # 50 > max_seq_len 32: the context is cropped
    with torch.no_grad():
        for t in range(1, out.shape[1]):
            context = out[:, max(0, t - 32):t]
            assert out[0, t] == model(context)[0, -1].argmax()


# ------------------------------------------------------------------------------------------ the command


def test_the_same_seed_prints_the_same_text(bytes_run, capsys):
    args = ["sample", str(bytes_run), "--prompt", "The ", "--tokens", "60", "--temperature", "1", "--seed", "3"]
    first, second = run_main(args, capsys), run_main(args, capsys)
    assert first[0] == 0 and first[1] == second[1]


def test_different_seeds_print_different_text(bytes_run, capsys):
    texts = {run_main(["sample", str(bytes_run), "--tokens", "60", "--temperature", "1", "--seed", str(seed)],
                      capsys)[1] for seed in (0, 1, 2)}
    assert len(texts) == 3


def test_temperature_0_prints_the_same_text_whatever_the_seed(bytes_run, capsys):
    texts = {run_main(["sample", str(bytes_run), "--tokens", "30", "--temperature", "0", "--seed", str(seed)],
                      capsys)[1] for seed in (0, 1)}
    assert len(texts) == 1


def test_the_prompt_is_printed_before_the_new_text(bytes_run, capsys):
    code, out, err = run_main(["sample", str(bytes_run), "--prompt", "Héllo = ", "--tokens", "0"], capsys)
    assert code == 0 and out == "Héllo = \n"
    assert "step-000000005.pt (step 5, run completed)" in err
    code, out, _ = run_main(["sample", str(bytes_run), "--prompt", "Héllo = ", "--tokens", "20"], capsys)
    assert code == 0 and out.startswith("Héllo = ") and len(out.encode()) > len("Héllo = \n".encode())


def test_a_gpt2_run_samples_with_the_network_cut_off(tmp_path, capsys, monkeypatch):
    run = train_tiny(tmp_path / "run", tmp_path / "cache", tokenizer="gpt2", max_steps=2)

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["sample", str(run), "--prompt", "The game", "--tokens", "12", "--temperature", "1", "--seed", "0"]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert out.startswith("The game") and run_main(args, capsys)[1] == out


def test_weights_saved_under_compile_or_ddp_prefixes_load(bytes_run, tmp_path, capsys):
    state = load_checkpoint(latest_checkpoint(bytes_run))
    state["model"] = {("_orig_mod." if i % 2 else "module.") + k: v for i, (k, v) in enumerate(state["model"].items())}
    wrapped = tmp_path / "wrapped.pt"
    torch.save(state, wrapped)
    args = ["sample", str(bytes_run), "--tokens", "20", "--seed", "1"]
    assert run_main(args + ["--checkpoint", str(wrapped)], capsys)[1] == run_main(args, capsys)[1]


def test_a_modular_run_is_refused_in_one_line(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", tmp_path / "cache", task="modular")
    code, out, err = run_main(["sample", str(run)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "is a --task modular run" in err


@pytest.mark.parametrize("args, message", [
    (["sample", "no/such/run"], "Directory 'no/such/run' does not exist"),
    (["sample", "."], "not a run folder (it has no config.json)"),
])
def test_a_missing_run_is_refused_in_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_a_run_without_a_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", tmp_path / "cache", max_steps=1, checkpoint_every=0)
    code, _, err = run_main(["sample", str(run)], capsys)
    assert code == 2 and err.count("\n") == 1 and "has no checkpoint" in err


@pytest.mark.parametrize("args, message", [
    (["--tokens", "-1"], "--tokens must be >= 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--prompt", ""], "--prompt must not be empty"),
])
def test_bad_sampling_settings_are_refused_in_one_line(bytes_run, args, message, capsys):
    code, out, err = run_main(["sample", str(bytes_run), *args], capsys)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_a_checkpoint_that_does_not_fit_the_run_is_refused_in_one_line(bytes_run, tmp_path, capsys):
    state = load_checkpoint(latest_checkpoint(bytes_run))
    state["model"]["head.weight"] = state["model"]["head.weight"][:, :8]
    other = tmp_path / "other.pt"
    torch.save(state, other)
    code, out, err = run_main(["sample", str(bytes_run), "--checkpoint", str(other)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "does not fit the architecture" in err and "head.weight" in err


# ------------------------------------------------------------------------------------------ refusals, one line each


def refused_in_one_line(code, out, err, message):
    assert "Traceback" not in err and code == 2 and out == "" and err.count("\n") == 1, err
    assert message in err, err


def a_copy_with_weights(run, tmp_path, weight):
    """The run's folder, copied, with every weight of its latest checkpoint set to `weight`, recorded as
    diverged: what a run that blew up leaves behind."""
    copy = tmp_path / "diverged"
    shutil.copytree(run, copy)
    checkpoint = latest_checkpoint(copy)
    state = load_checkpoint(checkpoint)
    state["model"] = {k: torch.full_like(v, weight) for k, v in state["model"].items()}
    torch.save(state, checkpoint)
    (copy / "summary.json").write_text(json.dumps({"status": "diverged", "error": "non-finite loss"}))
    return copy


@pytest.mark.parametrize("weight", [float("nan"), 3e38], ids=["nan-weights", "overflowing-weights"])
@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_a_diverged_run_s_checkpoint_is_refused_in_one_line(bytes_run, tmp_path, capsys, weight, temperature):
    diverged = a_copy_with_weights(bytes_run, tmp_path, weight)
    code, out, err = run_main(["sample", str(diverged), "--tokens", "5", "--temperature", temperature], capsys)
    refused_in_one_line(code, out, err, "scores for the next token are not finite")
    assert "--checkpoint" in err  # names the way out: an earlier checkpoint


def test_a_tiny_temperature_samples_what_temperature_0_picks(bytes_run, capsys):
    args = ["sample", str(bytes_run), "--tokens", "30", "--seed", "1", "--temperature"]
    greedy = run_main(args + ["0"], capsys)
    for tiny in ("1e-45", "1e-300", "5e-324"):  # below float32's smallest number; the smallest double
        code, out, err = run_main(args + [tiny], capsys)
        assert code == 0 and "Traceback" not in err and out == greedy[1]


def test_a_prompt_that_is_not_utf8_is_refused_in_one_line(bytes_run, capsys):
    prompt = b"The \xff".decode("utf-8", "surrogateescape")  # how Python passes the shell's $'The \xff'
    code, out, err = run_main(["sample", str(bytes_run), "--prompt", prompt], capsys)
    refused_in_one_line(code, out, err, "--prompt is not UTF-8 text")


def test_a_prompt_that_is_not_utf8_is_refused_by_the_installed_command(bytes_run):
    # Through a real process: the shell's byte 0xff reaches argv as a lone surrogate.
    args = [sys.executable, "-m", "hlb_gpt", "sample", str(bytes_run), "--prompt"]
    result = subprocess.run([os.fsencode(a) for a in args] + [b"The \xff"], capture_output=True, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b"" and err.count("\n") == 1, err
    assert "--prompt is not UTF-8 text" in err


@pytest.mark.parametrize("seed, message", [
    ("-1", "--seed must be in [0, 2**64 - 1] (got -1)"),
    ("99999999999999999999", "--seed must be in [0, 2**64 - 1] (got 99999999999999999999)"),
])
def test_a_seed_outside_what_a_generator_takes_is_refused_in_one_line(bytes_run, capsys, seed, message):
    code, out, err = run_main(["sample", str(bytes_run), "--seed", seed], capsys)
    refused_in_one_line(code, out, err, message)


def test_the_largest_seed_samples(bytes_run, capsys):
    code, out, err = run_main(["sample", str(bytes_run), "--tokens", "5", "--seed", str(2**64 - 1)], capsys)
    assert code == 0 and out, err


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """A second run of the same architecture as `bytes_run`, with another seed and the EMA filter."""
    root = tmp_path_factory.mktemp("other")
    return train_tiny(root / "run", root / "cache", seed=1, grokfast=True, alpha=0.9, gain=0.1)


def test_another_run_s_checkpoint_is_refused_in_one_line(bytes_run, other_run, capsys):
    code, out, err = run_main(["sample", str(bytes_run), "--checkpoint", str(latest_checkpoint(other_run))], capsys)
    refused_in_one_line(code, out, err, "is not a checkpoint of")
    assert "--seed: 1 vs 0" in err and "--grokfast: True vs False" in err


def test_a_checkpoint_of_the_run_copied_elsewhere_is_accepted(bytes_run, tmp_path, capsys):
    copy = tmp_path / "backup.pt"
    shutil.copy(latest_checkpoint(bytes_run), copy)
    args = ["sample", str(bytes_run), "--tokens", "10", "--seed", "2"]
    assert run_main(args + ["--checkpoint", str(copy)], capsys)[1] == run_main(args, capsys)[1]


def test_a_file_that_is_not_a_checkpoint_is_refused_in_one_line(bytes_run, capsys):
    code, out, err = run_main(["sample", str(bytes_run), "--checkpoint", str(bytes_run / "config.json")], capsys)
    refused_in_one_line(code, out, err, "config.json is not a checkpoint")
    assert "Please file an issue" not in err and "WeightsUnpickler" not in err


def test_a_config_that_is_json_but_not_an_object_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("[1, 2]")
    code, out, err = run_main(["sample", str(tmp_path / "run")], capsys)
    refused_in_one_line(code, out, err, "config.json is not a JSON object")


def test_an_unreadable_checkpoint_is_refused_in_one_line(bytes_run, tmp_path, capsys, monkeypatch):
    # Tests may run as root, whom no file mode stops: the refusal the system would give is simulated.
    checkpoint = tmp_path / "step.pt"
    shutil.copy(latest_checkpoint(bytes_run), checkpoint)
    real_open = open

    def refuse(path, *args, **kwargs):
        if str(path) == str(checkpoint):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    code, out, err = run_main(["sample", str(bytes_run), "--checkpoint", str(checkpoint)], capsys)
    refused_in_one_line(code, out, err, f"cannot read checkpoint {checkpoint}: Permission denied")
