"""--optimizer muon: torch's Muon on the block matrices beside AdamW on the rest, as one optimizer."""

import io
import os
import shutil
import subprocess

import pytest
import torch

from hlb_gpt.components.optimizers import MUON_LR, MUON_MOMENTUM
from hlb_gpt.config import ConfigError, RunConfig
from hlb_gpt.device import PeakMemory, memory_breakdown
from hlb_gpt.grokfast import NoFilter
from hlb_gpt.model import GPT, GPTConfig
from hlb_gpt.optim import make_muon, make_optimizer, make_scheduler, param_groups
from hlb_gpt.records import read_run
from hlb_gpt.sweep import expand_grid, run_folder_name
from hlb_gpt.train import train

from test_reliability import SMALL, hlb
# The reliability matrix's own kill -9 procedure, under a name pytest does not collect (else the matrix runs twice).
from test_reliability import test_a_killed_run_resumes_to_the_same_metrics_as_an_uninterrupted_one as killed_and_resumed

LR, WD, MUON = 2e-3, 0.01, dict(lr=0.02, momentum=0.95)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, depth=2, width=32, max_seq_len=16))


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 16), generator=gen) for _ in range(n)]


def train_steps(model, optimizers, schedulers, xs):
    for x in xs:
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        for sched in schedulers:
            sched.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


def muon_adamw(model):
    opt = make_muon(param_groups(model.named_parameters(), LR, WD), **MUON)
    return opt, make_scheduler(opt, warmup_steps=3)


@pytest.fixture(scope="module")
def combined_and_alone():
    """The same model trained 6 steps by MuonAdamW, and by torch's Muon and AdamW each on its own share."""
    combined = tiny_model()
    opt, sched = muon_adamw(combined)
    train_steps(combined, [opt], [sched], batches(6))

    alone = tiny_model()
    groups = param_groups(alone.named_parameters(), LR, WD)
    matrices = next(g for g in groups if g["name"] == "matrices")
    muon = torch.optim.Muon(matrices["params"], weight_decay=WD, **MUON)
    adamw = make_optimizer([g for g in groups if g["name"] != "matrices"])
    scheds = [make_scheduler(muon, warmup_steps=3), make_scheduler(adamw, warmup_steps=3)]
    train_steps(alone, [muon, adamw], scheds, batches(6))
    return dict(combined.named_parameters()), dict(alone.named_parameters()), {id(p) for p in matrices["params"]}


def test_muon_updates_the_block_matrices_as_torch_muon_alone(combined_and_alone):
    combined, alone, matrices = combined_and_alone
    names = [n for n, p in alone.items() if id(p) in matrices]
    assert names and all(n.startswith("blocks.") and alone[n].ndim == 2 for n in names)
    for name in names:
        assert torch.equal(combined[name], alone[name]), name


def test_every_other_parameter_gets_adamw_with_the_hlb_groups(combined_and_alone):
    combined, alone, matrices = combined_and_alone
    names = [n for n, p in alone.items() if id(p) not in matrices]
    assert {"embed.weight", "head.weight", "norm.weight", "blocks.0.position_bias"} <= set(names)
    for name in names:
        assert torch.equal(combined[name], alone[name]), name


def test_muons_lr_follows_the_schedule_of_the_adamw_groups():
    model = tiny_model()
    opt, sched = muon_adamw(model)
    train_steps(model, [opt], [sched], batches(5))
    assert opt.param_groups[0]["name"] == "matrices" and opt.param_groups[0] is opt.muon.param_groups[0]
    mults = {g["name"]: g["lr"] / g["initial_lr"] for g in opt.param_groups}
    assert len(mults) == 4 and len(set(mults.values())) == 1
    assert sched.get_last_lr()[0] == pytest.approx(MUON["lr"] * sched.lr_lambdas[0](5))


def test_a_state_dict_round_trip_mid_run_continues_identically():
    xs = batches(8)
    model = tiny_model()
    opt, sched = muon_adamw(model)
    train_steps(model, [opt], [sched], xs[:4])
    buffer = io.BytesIO()  # through torch.save, as a checkpoint goes
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer)
    train_steps(model, [opt], [sched], xs[4:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = tiny_model(seed=123)
    opt2, sched2 = muon_adamw(resumed)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    train_steps(resumed, [opt2], [sched2], xs[4:])
    assert [g["lr"] for g in opt2.muon.param_groups] == [g["lr"] for g in opt.muon.param_groups]
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_memory_breakdown_counts_both_optimizers_state():
    model = tiny_model()
    opt, sched = muon_adamw(model)
    train_steps(model, [opt], [sched], batches(1))
    nbytes = lambda o: sum(t.numel() * t.element_size() for s in o.state.values() for t in s.values())  # noqa: E731
    muon_bytes, adamw_bytes = nbytes(opt.muon), nbytes(opt.adamw)
    assert muon_bytes > 0 and adamw_bytes > 0
    memory = memory_breakdown(model, opt, NoFilter(), PeakMemory.start(torch.device("cpu")))
    assert memory["optimizer_bytes"] == muon_bytes + adamw_bytes


def test_a_muon_config_is_resolved_with_the_default_lr_and_momentum():
    cfg = RunConfig(optimizer="muon")
    assert (cfg.muon_lr, cfg.muon_momentum) == (MUON_LR, MUON_MOMENTUM)
    assert RunConfig().muon_lr is None  # other optimizers record no Muon settings


@pytest.mark.parametrize("settings, message", [
    (dict(muon_lr=0.01), "--muon-lr: for --optimizer muon only"),
    (dict(optimizer="grokadamw", muon_momentum=0.9), "--muon-momentum: for --optimizer muon only"),
    (dict(optimizer="muon", grok_kappa=0.5), "--grok-kappa: GrokAdamW settings, and GrokAdamW does not combine"),
    (dict(optimizer="muon", grok_gamma=0.2), "--grok-gamma: GrokAdamW settings"),
    (dict(optimizer="muon", task="modular"), "drop --optimizer muon"),
    (dict(optimizer="muon", muon_lr=0.0), "--muon-lr must be a positive number"),
    (dict(optimizer="muon", muon_momentum=1.0), "--muon-momentum must be in"),
])
def test_ill_defined_muon_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings)


def test_the_cli_refuses_muon_settings_without_muon_in_one_line(capsys):
    from hlb_gpt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--muon-lr", "0.01"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "--muon-lr" in err


def test_a_muon_sweep_names_its_runs_and_its_baseline_is_unfiltered_muon():
    base = RunConfig(optimizer="muon", grokfast=True, alpha=0.9, gain=0.1)
    configs = expand_grid(base, {}, grokfast=True, baseline=True)
    assert [run_folder_name(c) for c in configs] == ["muon-s0", "muon-ema-a0.9-g0.1-s0"]
    assert all(c.optimizer == "muon" for c in configs)


@pytest.mark.slow
@pytest.mark.parametrize("grokfast", [False, True])
def test_a_mini_run_with_muon_lowers_the_validation_loss(tmp_path, grokfast):
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, seq_len=32, batch_size=8,
                    optimizer="muon", grokfast=grokfast, alpha=0.9, gain=0.1, epochs=0.01, evals_per_epoch=400,
                    eval_tokens=2048, checkpoint_every=0, data_cache=str(tmp_path / "cache"))
    summary = train(cfg, tmp_path / "run", progress=False)
    losses = [row["val_loss"] for row in read_run(tmp_path / "run").metrics]
    assert summary["status"] == "completed" and summary["memory"]["optimizer_bytes"] > 0
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3


@pytest.mark.slow
def test_a_killed_muon_run_resumes_to_the_same_metrics_as_an_uninterrupted_one(tmp_path):
    killed_and_resumed(tmp_path, ["--optimizer", "muon"], "muon-s0")


@pytest.mark.slow
def test_torchrun_with_two_cpu_ranks_trains_muon_as_one_process_does(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun is not on PATH")
    args = SMALL + ["--optimizer", "muon", "--grokfast", "--alpha", "0.9", "--gain", "0.1", "--epochs", "0.002",
                    "--evals-per-epoch", "2000", "--data-cache", str(tmp_path / "cache")]
    single = hlb(args + ["--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "hlb_gpt", *args,
                          "--out", str(tmp_path / "ddp")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    run = read_run(tmp_path / "ddp" / "muon-ema-a0.9-g0.1-s0")
    checksums = run.summary["ddp"]["filter_checksums"]
    assert run.config["world_size"] == 2 and checksums[0] == checksums[1]
    one = read_run(tmp_path / "single" / "muon-ema-a0.9-g0.1-s0").metrics
    assert len(one) == len(run.metrics) >= 2
    for a, b in zip(one, run.metrics):  # the all-reduced mean rounds unlike one batch's; Muon works in bfloat16
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)


def test_muon_on_a_torch_without_it_is_refused_in_one_line_before_the_run_starts(tmp_path, monkeypatch):
    from hlb_gpt.train import check_attention

    monkeypatch.delattr(torch.optim, "Muon")
    cfg = RunConfig(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=32, device="cpu", compile=False,
                    data_cache=str(tmp_path / "cache"), optimizer="muon")
    message = f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}"
    with pytest.raises(ConfigError) as exc:
        check_attention(cfg)
    assert str(exc.value) == message
    with pytest.raises(ConfigError, match="needs torch >= 2.9"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# A non-finite step is skipped on the device, with no host sync


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {(which, i, k): v.clone() for which, inner in (("muon", opt.muon), ("adamw", opt.adamw))
             for i, st in enumerate(inner.state.values()) for k, v in st.items()}
    return params, state


def _assert_equal_snapshots(a, b):
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for part_a, part_b in zip(a, b):
        for key in part_a:
            assert torch.equal(part_a[key], part_b[key]), key


def _grads(model, x, bad=False):
    model(x, x).backward()
    if bad:
        next(iter(model.blocks[0].parameters())).grad[0, 0] = float("nan")


def test_muon_beside_fused_adamw_declares_that_it_skips_on_the_device():
    from hlb_gpt.train import skips_on_device

    opt, _ = muon_adamw(tiny_model())
    assert opt.adamw.defaults.get("fused")  # on the CPU too: torch has fused AdamW kernels for it
    assert skips_on_device(opt)


@pytest.mark.parametrize("first", [False, True], ids=["mid-run", "first step"])
def test_a_found_inf_step_leaves_params_and_both_states_bit_for_bit_and_later_steps_as_if_never_seen(first):
    xs = batches(4)
    model, twin = tiny_model(), tiny_model()
    opt, sched = muon_adamw(model)
    twin_opt, twin_sched = muon_adamw(twin)
    good = xs[:1] if not first else []
    for x in good:
        for m, o in ((model, opt), (twin, twin_opt)):
            _grads(m, x)
            o.found_inf = torch.tensor(0.0)
            o.step()
            o.zero_grad(set_to_none=True)
    before = _snapshot(model, opt)
    _grads(model, xs[1], bad=True)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    after = _snapshot(model, opt)
    if first:  # the state a first step creates is the state a fresh optimizer would create: zeros, step 0
        assert all(not v.any() for v in after[1].values())
        after = (after[0], {})
    _assert_equal_snapshots(before, after)
    sched.step()
    twin_sched.step()  # the schedule steps on a skipped step too
    for x in xs[2:]:
        for m, o in ((model, opt), (twin, twin_opt)):
            _grads(m, x)
            o.found_inf = torch.tensor(0.0)
            o.step()
            o.zero_grad(set_to_none=True)
    _assert_equal_snapshots(_snapshot(model, opt), _snapshot(twin, twin_opt))


def test_found_inf_zero_steps_exactly_as_torchs_muon_and_adamw_without_it(combined_and_alone):
    xs = batches(6)
    model = tiny_model()
    opt, sched = muon_adamw(model)
    for x in xs:
        _grads(model, x)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    _, alone, _ = combined_and_alone
    for name, p in model.named_parameters():
        assert torch.equal(p, alone[name]), name


def test_muon_beside_a_foreach_adamw_leaves_the_skip_to_the_trainers_host_check():
    from hlb_gpt.train import skips_on_device

    model = tiny_model()
    opt = make_muon(param_groups(model.named_parameters(), LR, WD), device_type="no-fused-kernels", **MUON)
    assert not opt.adamw.defaults.get("fused") and not skips_on_device(opt)
    _grads(model, batches(1)[0])
    opt.found_inf = torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="its AdamW is not fused"):
        opt.step()
