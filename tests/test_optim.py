"""Specification of hlb_gpt.optim: parameter groups, lr schedule, make_optimizer, GrokAdamW."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from hlb_gpt import components
from hlb_gpt.config import RunConfig
from hlb_gpt.optim import (
    GROUP_NAMES,
    GrokAdamW,
    PowerLawSchedule,
    grok_alpha,
    grokking_signal,
    group_of,
    layer_index,
    lr_lambda,
    make_optimizer,
    make_scheduler,
    model_depth,
    param_groups,
)

# ---------------------------------------------------------------------------------------------
# A stand-in with the parameter names of hlb_gpt.model


class _Block(nn.Module):
    def __init__(self, width: int, gate: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, bias=False)
        self.expand = nn.Parameter(torch.randn(5 * width, width) / width**0.5)
        self.project = nn.Parameter(torch.randn(width, 2 * width) / width**0.5)
        self.position_bias = nn.Parameter(torch.tensor(1.0))
        if gate:
            self.gate = nn.Parameter(torch.randn(width, width) / width**0.5)


class TinyGPT(nn.Module):
    def __init__(self, depth: int = 2, width: int = 8, vocab: int = 13, gate: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_Block(width, gate) for _ in range(depth))
        self.norm = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)


def _random_grads(params, generator: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def _snapshot(opt: torch.optim.Optimizer, params) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for index in a:
        assert a[index].keys() == b[index].keys()
        for key, value in a[index].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[index][key]), (index, key)
            else:
                assert value == b[index][key], (index, key)


# ---------------------------------------------------------------------------------------------
# Parameter groups


def test_param_groups_apply_spec_lr_multipliers_betas_and_decay_only_on_matrices():
    groups = {g["name"]: g for g in param_groups(TinyGPT().named_parameters(), lr=1e-3, weight_decay=0.1)}
    assert list(groups) == list(GROUP_NAMES)
    expected = {
        "matrices": (1e-3, 0.1, (0.9, 0.95)),
        "norms_embeddings": (32e-3, 0.0, (0.9, 0.95)),
        "position_bias": (100e-3, 0.0, (0.9, 0.95)),
        "head": (2e-3, 0.0, (0.6, 0.95)),
    }
    for name, (lr, wd, betas) in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr)
        assert groups[name]["weight_decay"] == wd
        assert groups[name]["betas"] == betas
        assert groups[name]["eps"] == 1e-9


def test_param_groups_hold_every_trainable_param_exactly_once_under_its_name():
    model = TinyGPT(depth=3)
    groups = param_groups(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    grouped = [(n, p) for g in groups for n, p in zip(g["names"], g["params"], strict=True)]
    assert sorted(n for n, _ in grouped) == sorted(n for n, _ in model.named_parameters())
    assert len({id(p) for _, p in grouped}) == len(grouped) == len(list(model.parameters()))
    params = dict(model.named_parameters())
    assert all(params[n] is p for n, p in grouped)
    members = {g["name"]: set(g["names"]) for g in groups}
    assert members["head"] == {"head.weight"}
    assert members["position_bias"] == {f"blocks.{i}.position_bias" for i in range(3)}
    assert members["norms_embeddings"] == {"embed.weight", "norm.weight"} | {
        f"blocks.{i}.norm.weight" for i in range(3)
    }
    assert members["matrices"] == {f"blocks.{i}.{m}" for i in range(3) for m in ("expand", "project", "gate")}


def test_param_groups_leave_out_frozen_params_and_empty_groups():
    model = TinyGPT(gate=False)
    for block in model.blocks:
        block.position_bias.requires_grad_(False)
    groups = param_groups(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["matrices", "norms_embeddings", "head"]
    assert not any("position_bias" in n or "gate" in n for g in groups for n in g["names"])


def test_unknown_names_are_grouped_by_shape_and_wrapper_prefixes_are_ignored():
    assert group_of("extra.weight", ndim=2) == "matrices"
    assert group_of("extra.bias", ndim=1) == "norms_embeddings"
    assert group_of("scale", ndim=0) == "norms_embeddings"
    assert group_of("_orig_mod.module.blocks.0.expand", ndim=2) == "matrices"
    assert group_of("module.head.weight", ndim=2) == "head"
    assert group_of("blocks.1.gate.weight", ndim=2) == "matrices"


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


def test_lr_schedule_warms_up_linearly_from_0_02_then_follows_power_law():
    schedule = lr_lambda()
    assert schedule(0) == pytest.approx(0.02)
    assert schedule(50) == pytest.approx(0.02 + 0.98 * 0.5)
    assert schedule(99) == pytest.approx(0.02 + 0.98 * 0.99)
    assert schedule(100) == pytest.approx(1.0)
    assert schedule(1000) == pytest.approx(901**-0.08)
    assert lr_lambda(warmup_steps=0)(0) == pytest.approx(1.0)


def test_lr_schedule_pickles_and_lives_in_scheduler_state_dict():
    schedule = lr_lambda(warmup_steps=10, start_mult=0.1, exponent=-0.5)
    assert pickle.loads(pickle.dumps(schedule)) == schedule

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    fresh = torch.optim.lr_scheduler.LambdaLR(opt, PowerLawSchedule())
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.lr_lambdas[0] == schedule


def test_make_scheduler_applies_same_multiplier_to_every_group():
    groups = param_groups(TinyGPT().named_parameters(), lr=1e-3, weight_decay=0.1)
    base = [g["lr"] for g in groups]
    opt = make_optimizer(groups)
    scheduler = make_scheduler(opt, warmup_steps=100)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * lr for lr in base])
    for _ in range(50):
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.51 * lr for lr in base])


# ---------------------------------------------------------------------------------------------
# make_optimizer


def test_make_optimizer_picks_fused_adamw_on_cpu_and_it_steps():
    model = TinyGPT()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(param_groups(model.named_parameters(), 1e-3, 0.1), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True
    _random_grads(model.parameters(), torch.Generator().manual_seed(0))
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_make_optimizer_falls_back_to_foreach_without_fused_kernels():
    opt = make_optimizer(param_groups(TinyGPT().named_parameters(), 1e-3, 0.1), device_type="no-such-device")
    assert opt.defaults["foreach"] is True
    assert not opt.defaults["fused"]


def test_adamw_keeps_group_names_through_state_dict_and_weights_only_load():
    model = TinyGPT()
    opt = make_optimizer(param_groups(model.named_parameters(), 1e-3, 0.1))
    _random_grads(model.parameters(), torch.Generator().manual_seed(0))
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert [g["name"] for g in loaded["param_groups"]] == list(GROUP_NAMES)
    fresh = make_optimizer(param_groups(model.named_parameters(), 1e-3, 0.1))
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[3]["names"] == ["head.weight"]


def test_fused_adamw_skips_step_when_found_inf_is_set():
    model = TinyGPT()
    params = list(model.parameters())
    opt = make_optimizer(param_groups(model.named_parameters(), 1e-3, 0.1))
    generator = torch.Generator().manual_seed(0)
    _random_grads(params, generator)
    opt.step()
    before = _snapshot(opt, params)
    _random_grads(params, generator)
    params[0].grad[0, 0] = float("inf")
    opt.found_inf = torch.tensor(1.0)
    opt.grad_scale = None
    opt.step()
    after = _snapshot(opt, params)
    assert all(torch.equal(b, a) for b, a in zip(before[0], after[0]))
    _assert_same_state(before[1], after[1])
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(params[1], before[0][1])


def test_grokadamw_takes_the_groups_hyperparameters():
    groups = param_groups(TinyGPT().named_parameters(), 1e-3, 0.1)
    opt = GrokAdamW(groups, lamb=0.5, foreach=False)
    head = opt.param_groups[-1]
    assert (head["name"], head["betas"], head["eps"], head["lamb"], head["foreach"]) == (
        "head",
        (0.6, 0.95),
        1e-9,
        0.5,
        False,
    )


def test_the_grokadamw_component_compiles_its_step_only_when_asked_and_adamw_is_fused_either_way():
    groups = lambda: param_groups(TinyGPT().named_parameters(), 1e-3, 0.1)  # noqa: E731
    cfg = RunConfig(optimizer="grokadamw", alpha=0.9, gain=0.5)
    grok = components.OPTIMIZERS["grokadamw"].build(cfg, groups(), "cpu", True)
    assert isinstance(grok, GrokAdamW) and grok.compile is True and grok.param_groups[0]["lamb"] == 0.5
    assert components.OPTIMIZERS["grokadamw"].build(cfg, groups(), "cpu", False).compile is False
    assert components.OPTIMIZERS["adamw"].build(RunConfig(), groups(), "cpu", True).defaults["fused"] is True


# ---------------------------------------------------------------------------------------------
# GrokAdamW: helpers


def test_layer_index_counts_embeddings_0_blocks_from_1_and_head_last():
    names = ["embed.weight", "blocks.0.expand", "blocks.7.norm.weight", "norm.weight", "head.weight"]
    depth = model_depth(names)
    assert depth == 8
    assert [layer_index(n, depth) for n in names] == [0, 1, 8, 9, 9]
    assert layer_index("_orig_mod.blocks.2.gate", depth) == 3
    assert layer_index("module.head.weight", depth) == 9
    assert layer_index("something.else", depth) == 0
    assert model_depth(["embed.weight", "head.weight"]) == 0


def test_grokking_signal_is_relative_generalisation_gap_and_never_negative():
    assert grokking_signal(train_loss=2.0, val_loss=2.5) == pytest.approx(0.2)
    assert grokking_signal(train_loss=3.0, val_loss=2.5) == 0.0
    assert grokking_signal(train_loss=0.0, val_loss=0.0) == 0.0


def test_alpha_t_clamps_to_between_zero_and_alpha_init():
    assert grok_alpha(0.98, kappa=0.1, signal=0.0) == 0.98
    assert grok_alpha(0.98, kappa=0.1, signal=0.5) == pytest.approx(0.98 * math.exp(-0.05))
    assert grok_alpha(0.98, kappa=-3.0, signal=0.5) == 0.98  # a negative kappa cannot push alpha past alpha_init
    assert grok_alpha(0.98, kappa=-1e6, signal=1.0) == 0.98  # nor overflow
    assert 0.0 <= grok_alpha(0.98, kappa=1e6, signal=1.0) <= 1e-300


def test_set_grokking_signal_starts_at_zero_and_is_saved_in_state_dict():
    opt = GrokAdamW([nn.Parameter(torch.zeros(3))])
    assert opt.param_groups[0]["grokking_signal"] == 0.0
    assert opt.set_grokking_signal(torch.tensor(2.0), torch.tensor(2.5)) == pytest.approx(0.2)
    assert opt.set_grokking_signal(2.0, float("nan")) == pytest.approx(0.2)  # a diverged eval changes nothing
    fresh = GrokAdamW([nn.Parameter(torch.zeros(3))])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["grokking_signal"] == pytest.approx(0.2)


def test_grokadamw_rejects_bad_hyperparameters_and_names_that_do_not_match_params():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="alpha_init"):
        GrokAdamW([p], alpha_init=1.0)
    with pytest.raises(ValueError, match="gamma"):
        GrokAdamW([p], gamma=1.5)
    with pytest.raises(ValueError, match="names"):
        GrokAdamW([{"params": [p], "names": ["a", "b"]}])


# ---------------------------------------------------------------------------------------------
# GrokAdamW: the update against its equations

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, alpha_init=0.9, lamb=2.0, gamma=0.2, kappa=0.5)
NAMES = ["embed.weight", "blocks.0.expand", "blocks.1.project", "head.weight"]  # layers 0, 1, 2, 3
SHAPES = [(6, 4), (10, 4), (4, 8), (6, 4)]
# (train, val) losses handed over before each step; None = no evaluation yet
EVALS = [None, (2.0, 2.5), (1.9, 2.6), None, (1.5, 3.0), None, None]


def _named_params(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    return [(n, nn.Parameter(torch.randn(s, generator=generator))) for n, s in zip(NAMES, SHAPES)]


def _grad_sequence(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=generator) for s in SHAPES] for _ in range(steps)]


def _grok(named, **overrides) -> GrokAdamW:
    # one group per parameter, as param_groups makes several, so depth must come from all groups' names
    groups = [{"params": [p], "names": [n]} for n, p in named]
    return GrokAdamW(groups, **(HYPER | overrides))


def _run(opt, params, grads_seq, evals=EVALS) -> None:
    for grads, losses in zip(grads_seq, evals):
        if losses is not None:
            opt.set_grokking_signal(*losses)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def reference_grokadamw(params, grads_seq, layers, evals, *, lr, betas, eps, weight_decay, alpha_init, lamb, gamma, kappa):
    """The GrokAdamW equations, written out in float64, one tensor at a time."""
    beta1, beta2 = betas
    p = [x.detach().double().clone() for x in params]
    mu = [torch.zeros_like(x) for x in p]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    s = 0.0
    for t, (grads, losses) in enumerate(zip(grads_seq, evals), start=1):
        if losses is not None:
            train, val = losses
            s = max(0.0, val - train) / max(val, train)
        alpha = min(max(alpha_init * math.exp(-kappa * s), 0.0), alpha_init)
        for i, g in enumerate(grads):
            g = g.double()
            mu[i] = alpha * mu[i] + (1 - alpha) * g
            g_hat = g + lamb * mu[i]
            p[i] = p[i] * (1 - lr * weight_decay)
            beta1_l = beta1 * (1 - gamma) ** layers[i]
            m[i] = beta1_l * m[i] + (1 - beta1_l) * g_hat
            v[i] = beta2 * v[i] + (1 - beta2) * g_hat**2
            m_hat = m[i] / (1 - beta1_l**t)
            v_hat = v[i] / (1 - beta2**t)
            p[i] = p[i] - lr * m_hat / (v_hat.sqrt() + eps)
    return p, mu, m, v


@pytest.mark.parametrize("path", ["foreach", "per-tensor", "compiled"])
@pytest.mark.parametrize("steps", [1, 5, 7])
def test_grokadamw_matches_spec_reference(steps, path):
    named = _named_params()
    params = [p for _, p in named]
    initial = [p.detach().clone() for p in params]
    grads_seq = _grad_sequence(steps)
    opt = _grok(named, foreach=path == "foreach", compile=path == "compiled")
    _run(opt, params, grads_seq)

    assert [opt.state[p]["layer"] for p in params] == [0, 1, 2, 3]
    p_ref, mu_ref, m_ref, v_ref = reference_grokadamw(initial, grads_seq, [0, 1, 2, 3], EVALS, **HYPER)
    for i, p in enumerate(params):
        state = opt.state[p]
        assert state["step"].item() == steps
        torch.testing.assert_close(p.detach().double(), p_ref[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(state["mu"].double(), mu_ref[i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg"].double(), m_ref[i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v_ref[i], rtol=1e-6, atol=1e-7)


def test_grokadamw_reference_test_can_fail_when_layer_momentum_is_ignored():
    # guards the reference comparison above: a flat beta1 (gamma ignored) is visibly different
    named = _named_params()
    params = [p for _, p in named]
    initial = [p.detach().clone() for p in params]
    grads_seq = _grad_sequence(3)
    _run(_grok(named), params, grads_seq)
    p_flat, *_ = reference_grokadamw(initial, grads_seq, [0, 0, 0, 0], EVALS, **HYPER)
    assert (params[3].detach().double() - p_flat[3]).abs().max() > 1e-4


def test_mu_starts_at_zero_so_first_step_stores_one_minus_alpha_times_gradient():
    named = _named_params()
    params = [p for _, p in named]
    opt = _grok(named)
    opt.set_grokking_signal(2.0, 2.5)
    (grads,) = _grad_sequence(1)
    _run(opt, params, [grads], evals=[None])
    alpha = grok_alpha(HYPER["alpha_init"], HYPER["kappa"], 0.2)
    for p, g in zip(params, grads):
        torch.testing.assert_close(opt.state[p]["mu"], (1 - alpha) * g)


def test_the_eager_per_tensor_step_is_the_compiled_body_run_eagerly(monkeypatch):
    from hlb_gpt import optim

    calls = []
    body = optim._fused_update
    monkeypatch.setattr(optim, "_fused_update", lambda *args: calls.append(len(args[0])) or body(*args))
    named = _named_params()
    opt = _grok(named, foreach=False)
    for (_, p), g in zip(named, _grad_sequence(1)[0]):
        p.grad = g.clone()
    opt.step()
    assert sum(calls) == len(named) and opt.compile is False  # every tensor, through the one update, uncompiled


@pytest.mark.parametrize("skip_at", [None, 0, 3])
def test_foreach_path_equals_the_per_tensor_path_to_float_rounding(skip_at):
    grads_seq = _grad_sequence(6)
    results = []
    for foreach in (True, False):
        named = _named_params()
        params = [p for _, p in named]
        opt = _grok(named, foreach=foreach)
        for step, grads in enumerate(grads_seq):
            if skip_at is not None:
                opt.found_inf = torch.tensor(float(step == skip_at))
            if step == 2:
                opt.set_grokking_signal(1.0, 1.7)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append(_snapshot(opt, params))
    (params_a, state_a), (params_b, state_b) = results
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for key in state_a:
        for name in ("mu", "exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state_b[key][name], state_a[key][name], rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_mid_stream_continues_identically():
    grads_seq = _grad_sequence(6)
    named = _named_params()
    params = [p for _, p in named]
    opt = _grok(named)
    _run(opt, params, grads_seq[:3], EVALS[:3])

    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_named = [(n, nn.Parameter(t.clone())) for n, t in zip(NAMES, checkpoint["params"])]
    resumed_params = [p for _, p in resumed_named]
    resumed = _grok(resumed_named, alpha_init=0.5)  # hyperparameters come from the checkpoint
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.param_groups[0]["alpha_init"] == HYPER["alpha_init"]

    _run(opt, params, grads_seq[3:], EVALS[3:])
    _run(resumed, resumed_params, grads_seq[3:], EVALS[3:])
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))
    _assert_same_state(opt.state_dict()["state"], resumed.state_dict()["state"])


@pytest.mark.parametrize("foreach", [True, False])
def test_found_inf_skip_leaves_params_and_state_untouched_and_later_steps_as_if_never_seen(foreach):
    grads_seq = _grad_sequence(4)
    bad = [g.clone() for g in grads_seq[0]]
    bad[1][0, 0] = float("inf")
    bad[2][1, 1] = float("nan")

    named = _named_params()
    params = [p for _, p in named]
    opt = _grok(named, foreach=foreach)
    opt.set_grokking_signal(2.0, 2.5)
    opt.found_inf = torch.tensor(1.0)
    _run(opt, params, [bad], evals=[None])  # skipped first step: nothing to initialise from
    assert all(torch.equal(p, q) for p, (_, q) in zip(params, _named_params()))
    assert all(opt.state[p]["step"].item() == 0 for p in params)
    opt.found_inf = torch.tensor(0.0)
    _run(opt, params, grads_seq[:2], evals=[None, None])
    before = _snapshot(opt, params)
    opt.found_inf = torch.tensor(1.0)
    _run(opt, params, [bad], evals=[None])
    after = _snapshot(opt, params)
    assert all(torch.equal(b, a) for b, a in zip(before[0], after[0]))
    _assert_same_state(before[1], after[1])
    opt.found_inf = torch.tensor(0.0)
    _run(opt, params, grads_seq[2:], evals=[None, None])

    clean_named = _named_params()
    clean_params = [p for _, p in clean_named]
    clean = _grok(clean_named, foreach=foreach)
    clean.set_grokking_signal(2.0, 2.5)
    _run(clean, clean_params, grads_seq, evals=[None] * 4)
    assert all(torch.equal(a, b) for a, b in zip(params, clean_params))
    _assert_same_state(opt.state_dict()["state"], clean.state_dict()["state"])


@pytest.mark.parametrize("foreach", [True, False])
def test_grokadamw_without_filter_or_layer_momentum_equals_torch_adamw(foreach):
    torch.manual_seed(0)
    model = TinyGPT(depth=3)
    twin = copy.deepcopy(model)
    grok = GrokAdamW(param_groups(model.named_parameters(), 3e-3, 0.1), lamb=0.0, gamma=0.0, foreach=foreach)
    adamw = torch.optim.AdamW(param_groups(twin.named_parameters(), 3e-3, 0.1), foreach=False)
    generator = torch.Generator().manual_seed(1)
    for step in range(10):
        if step == 4:
            grok.set_grokking_signal(1.0, 2.0)  # alpha_t changes mu only, which lamb = 0 ignores
        _random_grads(model.parameters(), generator)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        grok.step()
        adamw.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(grok.state[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_grokadamw_takes_layers_from_named_parameters_and_works_with_the_scheduler():
    model = TinyGPT(depth=2)
    opt = GrokAdamW(model.named_parameters(), lr=1e-3)
    scheduler = make_scheduler(opt, warmup_steps=10)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.blocks[1].expand.grad = torch.ones_like(model.blocks[1].expand)
    opt.step()
    scheduler.step()
    assert opt.state[model.head.weight]["layer"] == 3
    assert opt.state[model.blocks[1].expand]["layer"] == 2
    assert model.embed.weight not in opt.state  # no gradient, no state
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (0.02 + 0.98 * 0.1))


def test_grokadamw_step_returns_closure_loss():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = GrokAdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert p.abs().sum().item() < 3.0


# ---------------------------------------------------------------------------------------------
# GrokAdamW: the compiled step


def _scheduled_run(opt, params, grads_seq, skip_at, on_skip=None) -> None:
    """Steps as the trainer takes them: found_inf always set, lr changed every step (a scheduler), a new
    signal at step 2, and at `skip_at` non-finite gradients with found_inf = 1."""
    for step, grads in enumerate(grads_seq):
        grads = [g.clone() for g in grads]
        if step == skip_at:
            grads[1][0, 0], grads[2][1, 1] = float("inf"), float("nan")
        if step == 2:
            opt.set_grokking_signal(1.0, 1.7)
        for p, g in zip(params, grads):
            p.grad = g
        opt.found_inf = torch.tensor(float(step == skip_at))
        before = _snapshot(opt, params)
        opt.step()
        if step == skip_at and on_skip is not None:
            on_skip(before, _snapshot(opt, params))
        for group in opt.param_groups:
            group["lr"] *= 0.8


def _grok_groups_apart(named, **overrides) -> GrokAdamW:
    """One group per parameter (layers 0..3), each with its own lr and weight decay, as param_groups makes."""
    opt = _grok(named, **overrides)
    for i, group in enumerate(opt.param_groups):
        group["lr"] *= [1.0, 32.0, 2.0, 100.0][i]
        group["weight_decay"] *= i
    return opt


def test_compiled_step_equals_foreach_step_through_lr_changes_a_new_signal_and_a_skipped_step():
    grads_seq = _grad_sequence(7)
    runs = []

    def unchanged(before, after):
        assert all(torch.equal(b, a) for b, a in zip(before[0], after[0]))
        _assert_same_state(before[1], after[1])

    for compile in (False, True):
        named = _named_params()
        params = [p for _, p in named]
        opt = _grok_groups_apart(named, compile=compile)
        _scheduled_run(opt, params, grads_seq, skip_at=4, on_skip=unchanged)
        assert opt.compile is compile  # it did not fall back
        runs.append((params, opt))
    (foreach_params, foreach), (compiled_params, compiled) = runs
    assert [compiled.state[p]["layer"] for p in compiled_params] == [0, 1, 2, 3]
    for p, q in zip(foreach_params, compiled_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        for key in ("mu", "exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(compiled.state[q][key], foreach.state[p][key], rtol=1e-6, atol=1e-7)
    assert compiled.state[compiled_params[0]]["step"].item() == 6  # 7 steps, one skipped


def test_compiled_step_compiles_once_for_every_lr_and_setting_of_a_sweep():
    from torch._dynamo.utils import counters

    settings = [{}, dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0, alpha_init=0.5, lamb=0.1, gamma=0.0),
                dict(lr=1e-1, eps=1e-6, alpha_init=0.99, lamb=5.0, gamma=0.5, kappa=2.0)]
    graphs = counters["stats"]["unique_graphs"]
    for setting in settings:
        named = _named_params()
        opt = _grok_groups_apart(named, compile=True, **setting)
        _scheduled_run(opt, [p for _, p in named], _grad_sequence(3), skip_at=None)
        assert opt.compile
    # One graph for all (none if an earlier test compiled these shapes): lr and settings are tensor data.
    assert counters["stats"]["unique_graphs"] - graphs <= 1


def test_compiled_state_dict_round_trip_continues_identically_and_loads_into_the_foreach_path():
    grads_seq = _grad_sequence(6)
    named = _named_params()
    params = [p for _, p in named]
    opt = _grok_groups_apart(named, compile=True)
    _scheduled_run(opt, params, grads_seq[:3], skip_at=1)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buffer)
    assert all("compile" not in group for group in opt.state_dict()["param_groups"])  # not a setting: how it runs

    resumed = []
    for compile in (True, False):
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        twin_named = [(n, nn.Parameter(t.clone())) for n, t in zip(NAMES, checkpoint["params"])]
        twin = _grok(twin_named, compile=compile)
        twin.load_state_dict(checkpoint["optimizer"])
        assert twin.compile is compile
        _scheduled_run(twin, [p for _, p in twin_named], grads_seq[3:], skip_at=None)
        resumed.append([p for _, p in twin_named])
    _scheduled_run(opt, params, grads_seq[3:], skip_at=None)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed[0]))
    for a, b in zip(params, resumed[1]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_a_compile_failure_falls_back_to_the_eager_step_with_one_warning(monkeypatch, caplog):
    from hlb_gpt import optim

    def broken_compiler():
        def step(*args):
            raise RuntimeError("inductor: no C++ compiler\nmore detail")
        return step

    monkeypatch.setattr(optim, "_compiled_update", broken_compiler)
    grads_seq = _grad_sequence(4)
    runs = []
    for compile in (True, False):
        named = _named_params()
        opt = _grok_groups_apart(named, compile=compile)
        with caplog.at_level("WARNING", logger="hlb_gpt.optim"):
            _scheduled_run(opt, [p for _, p in named], grads_seq, skip_at=2)
        assert opt.compile is False
        runs.append(_snapshot(opt, [p for _, p in named]))
    assert [r.getMessage() for r in caplog.records] == [
        "GrokAdamW: the compiled step failed (RuntimeError: inductor: no C++ compiler); stepping eagerly from now on"]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    _assert_same_state(runs[0][1], runs[1][1])
