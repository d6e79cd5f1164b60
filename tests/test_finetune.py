"""Fine-tuning: --init-from a run's weights, LoRA adapters (--lora-*), component fine-tuning (--train-only)."""

import hashlib
import shutil
import signal

import pytest
import torch

from hlb_gpt import durable, finetune
from hlb_gpt import train as train_module
from hlb_gpt.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.model import GPT, GPTConfig
from hlb_gpt.optim import param_groups
from hlb_gpt.records import read_run
from hlb_gpt.sweep import run_sweep
from hlb_gpt.train import train
from test_reliability import SMALL, hlb, numbers, start, tiny_run, wait_for
from tiny_runs import run_main

# The SMALL model: 1 block of width 32 (queries and keys 4 wide, GeGLU halves 64 wide), bytes (vocab 256).
WIDTH, HIDDEN, QK, VOCAB = 32, 64, 4, 256
EXPAND = (2 * QK + 2 * HIDDEN, WIDTH)  # (out, in) of each matrix
PROJECT = (WIDTH, HIDDEN)


def lora_params(rank, shapes):
    """A rank-r adapter of an (out x in) matrix has r x in (A) + out x r (B) parameters."""
    return sum(rank * (n_in + n_out) for n_out, n_in in shapes)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny run trained for 31 steps: the run every fine-tune here starts from."""
    root = tmp_path_factory.mktemp("pretrained")
    cfg = tiny_run(root, epochs=0.003, evals_per_epoch=1, checkpoint_every=1.0)
    train(cfg, root / "run", progress=False)
    return root / "run"


def fine_tune(pretrained, tmp_path, **changes):
    """The pretrained run's settings, fine-tuned from its weights."""
    return tiny_run(tmp_path, **{"init_from": str(pretrained), "epochs": 0.002, "evals_per_epoch": 1, **changes})


def small_model(gate="none"):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, depth=1, width=WIDTH, max_seq_len=32, gate=gate))


# ----------------------------------------------------------------------------------------------- the adapters


def test_an_adapted_model_starts_bit_identical_to_its_base():
    model = small_model(gate="relu")
    idx = torch.randint(0, VOCAB, (2, 16))
    before = model(idx)
    finetune.apply_lora(model, rank=4, alpha=8.0, targets=["in", "out", "gate", "head"])
    assert torch.equal(model(idx), before)


def test_only_the_adapters_train_and_their_count_is_rank_times_in_plus_out_per_matrix():
    model = small_model(gate="sigmoid")
    trainable = finetune.apply_lora(model, rank=3, alpha=6.0, targets=["in", "out", "gate", "head"])
    expected = lora_params(3, [EXPAND, PROJECT, (WIDTH, WIDTH), (VOCAB, WIDTH)])
    assert trainable == expected == finetune.trainable_params(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)


def test_lora_with_train_only_norms_also_trains_every_layernorm():
    model = small_model()
    trainable = finetune.apply_lora(model, rank=2, alpha=4.0, targets=["in", "out"], train_only=["norms"])
    assert trainable == lora_params(2, [EXPAND, PROJECT]) + 2 * WIDTH  # the block's norm and the final one
    assert model.norm.weight.requires_grad and model.blocks[0].norm.weight.requires_grad


def test_adapters_join_the_block_matrix_group():
    model = small_model()
    finetune.apply_lora(model, rank=2, alpha=4.0, targets=["in", "out", "head"])
    groups = param_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["matrices"] and len(groups[0]["params"]) == 6


def test_the_merged_state_of_an_adapted_model_computes_what_it_computes():
    model = small_model()
    finetune.apply_lora(model, rank=2, alpha=4.0, targets=["in", "out", "head"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    plain = small_model()
    plain.load_state_dict(finetune.merged_state_dict(model.state_dict(), lora_alpha=4.0, lora_rank=2))
    idx = torch.randint(0, VOCAB, (2, 16))
    assert torch.allclose(plain(idx), model(idx), atol=1e-5)
    wrapped = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # as a compiled model saves it
    assert finetune.merged_state_dict(wrapped, 4.0, 2).keys() == plain.state_dict().keys()


def test_a_tied_head_gets_no_adapter():
    model = small_model()
    model.head.weight = model.embed.weight
    with pytest.raises(ConfigError, match="shares its matrix with the embedding"):
        finetune.apply_lora(model, rank=2, alpha=4.0, targets=["head"])


def test_train_only_freezes_every_other_component():
    model = small_model()
    finetune.freeze_except(model, ["position", "head"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"blocks.0.position_bias", "head.weight"}


# ----------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("changes, message", [
    (dict(init_from="x", train_only="attn"), "attention and MLP share"),
    (dict(init_from="x", lora_rank=4, lora_targets="in,gate"), "no gate"),
    (dict(init_from="x", lora_rank=4, lora_targets="in,qkv"), "unknown qkv"),
    (dict(init_from="x", lora_rank=4, train_only="in,norms"), "--train-only in would train"),
    (dict(init_from="x", lora_rank=-1), "--lora-rank"),
    (dict(init_from="x", lora_rank=4, lora_alpha=0.0), "--lora-alpha"),
    (dict(task="modular", init_from="x"), "--task modular"),
])
def test_bad_fine_tuning_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as exc:
        RunConfig(**changes)
    assert "\n" not in str(exc.value)


def test_lora_without_init_from_trains_adapters_on_the_random_initialisation_with_a_warning(tmp_path, caplog):
    cfg = tiny_run(tmp_path, lora_rank=2, max_steps=2, evals_per_epoch=1)
    with caplog.at_level("WARNING", logger="hlb_gpt.finetune"):
        summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and "without --init-from" in caplog.text
    assert summary["memory"]["trainable_params"] == lora_params(2, [EXPAND, PROJECT])


def test_lists_are_recorded_in_one_order_so_equal_settings_compare_equal():
    cfg = RunConfig(init_from="x", lora_rank=2, lora_targets="head, out,in,out", train_only="norms,embed")
    assert (cfg.lora_targets, cfg.train_only) == ("in,out,head", "embed,norms")


def test_the_memory_check_counts_only_the_trainable_parameters():
    cfg = RunConfig(preset="tiny", tokenizer="bytes", depth=1, width=32, lora_rank=2)
    assert finetune.count_trainable(cfg) == lora_params(2, [EXPAND, PROJECT])
    assert finetune.count_trainable(cfg.replace(lora_rank=0, train_only="head")) == VOCAB * WIDTH


# ----------------------------------------------------------------------------------------------- runs


def test_a_lora_fine_tune_lowers_val_loss_keeps_the_base_bit_identical_and_reports_its_size(pretrained, tmp_path):
    base = load_checkpoint(latest_checkpoint(pretrained))["model"]
    summary = train(fine_tune(pretrained, tmp_path, lora_rank=2, grokfast=True), tmp_path / "ft", progress=False)
    start_loss = read_run(pretrained).summary["final_val_loss"]  # the same validation windows, the same weights
    assert summary["status"] == "completed" and summary["final_val_loss"] < start_loss

    tuned = load_checkpoint(latest_checkpoint(tmp_path / "ft"))["model"]
    merged_away = {"blocks.0.expand": "blocks.0.parametrizations.expand.original",
                   "blocks.0.project": "blocks.0.parametrizations.project.original"}
    for key, value in base.items():
        assert torch.equal(tuned[merged_away.get(key, key)], value), key
    assert tuned["blocks.0.parametrizations.expand.0.lora_B"].abs().sum() > 0  # the adapters did train

    n = lora_params(2, [EXPAND, PROJECT])
    memory, config = summary["memory"], read_run(tmp_path / "ft").config
    assert memory["trainable_params"] == n
    assert memory["grads_bytes"] == memory["filter_bytes"] == 4 * n  # float32 gradients; one float32 EMA copy
    assert memory["optimizer_bytes"] == 2 * 4 * n + 4 * 4  # AdamW's two moments, a step counter per tensor
    assert config["init_step"] == 31 and config["init_checkpoint"] == str(latest_checkpoint(pretrained))


def test_train_only_trains_the_named_components_and_leaves_the_rest_bit_identical(pretrained, tmp_path):
    base = load_checkpoint(latest_checkpoint(pretrained))["model"]
    summary = train(fine_tune(pretrained, tmp_path, train_only="head,position"), tmp_path / "ft", progress=False)
    tuned = load_checkpoint(latest_checkpoint(tmp_path / "ft"))["model"]
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"head.weight", "blocks.0.position_bias"}
    assert summary["memory"]["trainable_params"] == VOCAB * WIDTH + 1


def test_a_lora_run_that_dies_mid_way_resumes_to_the_metrics_of_an_uninterrupted_one(pretrained, tmp_path,
                                                                                      monkeypatch):
    import hlb_gpt.train as train_module
    from hlb_gpt.records import RunWriter

    cfg = fine_tune(pretrained, tmp_path, lora_rank=2, grokfast=True, evals_per_epoch=20_000,
                    checkpoint_every=0.001)
    train(cfg, tmp_path / "direct", progress=False)
    real_step, calls = train_module.optimizer_step, []

    def dies_at_step_15(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_module, "optimizer_step", dies_at_step_15)
        m.setattr(RunWriter, "write_summary", lambda self, summary: None)  # as a kill -9 leaves it
        with pytest.raises(KeyboardInterrupt):
            run_sweep([cfg], tmp_path / "sweep", progress=False)
    run = tmp_path / "sweep" / "ema-a0.98-g2-s0"
    assert read_run(run).summary is None and list_checkpoints(run)
    assert run_sweep([cfg], tmp_path / "sweep", progress=False)[0].status == "completed"
    assert numbers(run) == numbers(tmp_path / "direct")


@pytest.mark.parametrize("changes", [dict(lora_rank=2), dict(lora_rank=2, train_only="norms"),
                                     dict(train_only="in,out")], ids=["lora", "lora+norms", "train-only"])
def test_muon_trains_the_matrices_a_fine_tune_trains_and_adamw_the_rest(pretrained, tmp_path, changes):
    summary = train(fine_tune(pretrained, tmp_path, optimizer="muon", **changes), tmp_path / "ft", progress=False)
    assert summary["status"] == "completed", summary["error"]
    assert summary["final_val_loss"] < read_run(pretrained).summary["final_val_loss"]
    state = load_checkpoint(latest_checkpoint(tmp_path / "ft"))["optimizer"]
    muon_names = [n for g in state["muon"]["param_groups"] for n in g["names"]]
    adamw_names = [n for g in (state["adamw"] or {}).get("param_groups", []) for n in g["names"]]
    matrices = (".lora_A", ".lora_B") if changes.get("lora_rank") else (".expand", ".project")
    assert muon_names and all(n.endswith(matrices) for n in muon_names)
    assert all("norm" in n for n in adamw_names) and bool(adamw_names) == ("norms" in changes.get("train_only", ""))


def test_muon_with_nothing_for_muon_to_train_is_refused_before_any_work_in_one_line(pretrained, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--optimizer muon.*--train-only position,head"):
        RunConfig(init_from="x", optimizer="muon", train_only="position,head")
    code, _, err = run_main(["--init-from", str(pretrained), "--optimizer", "muon", "--train-only", "head",
                             "--out", str(tmp_path / "out"), "-q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--optimizer muon" in err and "--train-only" in err
    assert not (tmp_path / "out").exists()


def test_init_from_takes_the_runs_architecture_and_refuses_another_in_one_line(pretrained, tmp_path, capsys):
    from hlb_gpt.cli import main

    args = ["--init-from", str(pretrained), "--dataset", "mini", "--data-cache", str(tmp_path / "cache"),
            "--max-steps", "2", "--eval-tokens", "1024", "--lora-rank", "2", "-q"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "ok")])
    assert exc.value.code == 0, capsys.readouterr().err
    config = read_run(tmp_path / "ok" / "baseline-s0").config
    assert (config["depth"], config["width"], config["tokenizer"], config["preset"], config["seq_len"]) == \
        (1, 32, "bytes", "tiny", 32)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "bad"), "--depth", "2", "--gate", "relu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--depth 2 vs 1" in err and "--gate relu vs none" in err
    assert not (tmp_path / "bad").exists()


def test_init_from_a_folder_without_a_run_or_checkpoint_is_refused(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        finetune.check_init(fine_tune(tmp_path / "nothing", tmp_path))
    copy = tmp_path / "nockpt"
    copy.mkdir()
    (copy / "config.json").write_bytes((pretrained / "config.json").read_bytes())
    with pytest.raises(ConfigError, match="no checkpoint"):
        finetune.check_init(fine_tune(copy, tmp_path))


def test_a_lora_rank_sweep_with_grokfast_and_baseline_runs_and_compares(pretrained, tmp_path):
    out = tmp_path / "sweep"
    done = hlb(["--init-from", str(pretrained), "--dataset", "mini", "--data-cache", str(tmp_path / "cache"),
                "--lora-rank", "2,8", "--grokfast", "--baseline", "--seed", "0,1", "--max-steps", "3",
                "--eval-tokens", "1024", "--out", str(out), "-q"])
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir() if (p / "summary.json").exists())
    assert names == sorted(f"{kind}-r{r}-s{s}" for kind in ("baseline", "ema-a0.98-g2") for r in (2, 8) for s in (0, 1))
    filters = {r: read_run(out / f"ema-a0.98-g2-r{r}-s0").summary["memory"]["filter_bytes"] for r in (2, 8)}
    assert filters == {r: 4 * lora_params(r, [EXPAND, PROJECT]) for r in (2, 8)}

    table = hlb(["compare", str(out)])
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "lora_rank=" in line]
    assert len(rows) == 4
    header = next(line for line in table.stdout.splitlines() if line.startswith("| configuration"))
    pairs = [c.strip() for c in header.split("|")].index("pairs")
    filtered = [r for r in rows if r.startswith("| ema")]
    assert len(filtered) == 2 and all(r.split("|")[pairs].strip() == "2" for r in filtered)  # paired over 2 seeds


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_same_metrics(pretrained, tmp_path):
    args = [*SMALL, "--init-from", str(pretrained), "--lora-rank", "4", "--lora-targets", "in,out,head",
            "--grokfast", "--epochs", "0.004", "--evals-per-epoch", "2000", "--checkpoint-every", "0.001",
            "--data-cache", str(tmp_path / "cache")]
    assert hlb([*args, "--out", str(tmp_path / "full")]).returncode == 0
    run = tmp_path / "killed" / "ema-a0.98-g2-s0"
    proc = start([*args, "--out", str(tmp_path / "killed")])
    wait_for(lambda: len(list_checkpoints(run)) >= 1 and read_run(run).metrics, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_run(run).summary is None
    rerun = hlb([*args, "--out", str(tmp_path / "killed")])
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed at step" in rerun.stderr
    assert numbers(run) == numbers(tmp_path / "full" / "ema-a0.98-g2-s0")


# ----------------------------------------------------------------------------------------------- the base, fixed once


def own_base(pretrained, tmp_path):
    """A copy of the pretrained run that this test may train on and delete; its checkpoint now and that one's sha."""
    base = tmp_path / "base"
    shutil.copytree(pretrained, base)
    first = latest_checkpoint(base)
    return base, first, hashlib.sha256(first.read_bytes()).hexdigest()


def dies_at_step(monkeypatch, n):
    """The next run is killed at its n-th step, leaving what a kill -9 leaves (no summary)."""
    from hlb_gpt.records import RunWriter

    real_step, calls = train_module.optimizer_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", step)
    monkeypatch.setattr(RunWriter, "write_summary", lambda self, summary: None)


def base_moves_on(base):
    """The base run trains on: a later checkpoint with other weights, the oldest pruned as training does."""
    saved = load_checkpoint(latest_checkpoint(base))
    step = saved["loop"]["step"] + 10
    saved["loop"]["step"], saved["model"] = step, {k: v + 0.01 for k, v in saved["model"].items()}
    save_checkpoint(base, step, saved, keep=2)


def test_a_fine_tune_resumed_after_its_base_moved_from_elsewhere_and_after_the_base_is_gone_keeps_its_base(
        pretrained, tmp_path, monkeypatch, capsys):
    base, first, sha = own_base(pretrained, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [*SMALL, "--init-from", "base", "--lora-rank", "4", "--epochs", "0.002", "--evals-per-epoch", "20000",
            "--checkpoint-every", "0.0005", "--data-cache", str(tmp_path / "cache")]
    assert run_main([*args, "--out", "direct"], capsys)[0] == 0
    run = tmp_path / "ft" / "baseline-s0"
    with monkeypatch.context() as m:
        dies_at_step(m, 8)
        assert run_main([*args, "--out", "ft"], capsys)[0] == 130
    assert read_run(run).summary is None and list_checkpoints(run)

    base_config = RunConfig.from_dict(read_run(base).config)
    assert train(base_config.replace(epochs=0.004), base, progress=False, resume=True)["steps"] > 31  # extended
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with monkeypatch.context() as m:
        dies_at_step(m, 6)
        code, _, err = run_main(["--resume", str(run), "-q"], capsys)
        assert code == 130, err
    shutil.rmtree(base)
    code, _, err = run_main(["--resume", str(run), "-q"], capsys)
    assert code == 0, err

    config = read_run(run).config
    assert config["init_from"] == str(base.resolve())
    assert (config["init_checkpoint"], config["init_step"], config["init_sha256"]) == (str(first), 31, sha)
    assert numbers(run) == numbers(tmp_path / "direct" / "baseline-s0")


def test_a_fine_tune_sweep_starts_every_run_from_one_base_checkpoint_while_the_base_moves_on(pretrained, tmp_path,
                                                                                             monkeypatch, capsys):
    from hlb_gpt.compare import compare, load_runs

    base, first, sha = own_base(pretrained, tmp_path)
    real_train, started = train_module.train, []

    def base_moves_then_train(cfg, run_dir, **kwargs):
        base_moves_on(base)
        started.append(run_dir.name)
        if len(started) == 2:
            raise KeyboardInterrupt  # the sweep is stopped; the same command (or another worker) goes on later
        return real_train(cfg, run_dir, **kwargs)

    monkeypatch.setattr(train_module, "train", base_moves_then_train)
    out = tmp_path / "sweep"
    args = [*SMALL, "--init-from", str(base), "--lora-rank", "2", "--seed", "0,1,2", "--max-steps", "3",
            "--data-cache", str(tmp_path / "cache"), "--out", str(out)]
    assert run_main(args, capsys)[0] == 130
    assert run_main(args, capsys)[0] == 0
    assert first not in list_checkpoints(base)  # the base moved on 4 times and pruned the one the sweep started from
    for seed in (0, 1, 2):
        config = read_run(out / f"baseline-s{seed}").config
        assert (config["init_checkpoint"], config["init_step"], config["init_sha256"]) == (str(first), 31, sha)
    runs, _ = load_runs([out])
    assert [g.n for g in compare(runs, "final", "all").groups] == [3]  # one configuration

    other = tmp_path / "other"
    shutil.copytree(pretrained, other)
    code, _, err = run_main([*args[:-1], str(out), "--init-from", str(other)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "start from" in err


def test_two_workers_pinning_one_sweep_at_once_agree_on_the_pin_written_first(pretrained, tmp_path, monkeypatch):
    import os

    base, _, _ = own_base(pretrained, tmp_path)
    real_link = os.link

    def another_worker_pins_first(src, dst):
        monkeypatch.setattr(durable.os, "link", real_link)
        base_moves_on(base)  # the other worker read the base after it moved on
        assert finetune.pin_base(tmp_path / "sweep", base).step == 41
        real_link(src, dst)

    monkeypatch.setattr(durable.os, "link", another_worker_pins_first)  # the pin is created by a hard link
    assert finetune.pin_base(tmp_path / "sweep", base).step == 41
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [finetune.PINNED]  # no temporary file left
