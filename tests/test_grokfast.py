"""Grokfast filters against plain per-parameter reference loops written from the formulas."""

import io
import math
import re

import pytest
import torch

from hlb_gpt.grokfast import EMAFilter, GradFilter, MAFilter, NoFilter

SHAPES = [(3, 4), (7,), (), (2, 3, 5)]


# -- plain reference loops, one parameter at a time, in float64 --------------------------------------
def reference_ema(schedule, alpha, gain):
    """mu_1 = g_1 (gradient unchanged); then mu = alpha*mu + (1-alpha)*g, g += gain*mu."""
    mu, out = {}, []
    for grads in schedule:
        filtered = {}
        for i, g in grads.items():
            if g is None:
                continue
            g = g.double()
            if i not in mu:
                mu[i] = g.clone()
                filtered[i] = g
            else:
                mu[i] = alpha * mu[i] + (1 - alpha) * g
                filtered[i] = g + gain * mu[i]
        out.append(filtered)
    return out, mu


def reference_ma(schedule, window, gain):
    """once W gradients have been seen, g += gain * (mean of the last W, this one included)."""
    history, out = {}, []
    for grads in schedule:
        filtered = {}
        for i, g in grads.items():
            if g is None:
                continue
            seen = history.setdefault(i, [])
            seen.append(g.double())
            if len(seen) >= window:
                filtered[i] = g.double() + gain * torch.stack(seen[-window:]).mean(0)
            else:
                filtered[i] = g.double()
        out.append(filtered)
    return out


# -- helpers --------------------------------------------------------------------------------------------
def make_params(dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]


def random_schedule(steps, shapes=SHAPES, seed=0, dtype=torch.float32, holes=True):
    """Random gradients per step; some parameters have no gradient at some steps (and p3 starts late)."""
    gen = torch.Generator().manual_seed(seed)
    schedule = []
    for t in range(steps):
        grads = {i: torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes)}
        if holes:
            if t in (3, 4, 11):
                grads[1] = None
            if t < 2:
                grads[3] = None
        schedule.append(grads)
    return schedule


def run(filt, params, schedule, found=lambda t: None):
    """Feed the schedule through the filter; return the filtered gradients of every step."""
    out = []
    for t, grads in enumerate(schedule):
        for i, p in enumerate(params):
            g = grads.get(i)
            p.grad = None if g is None else g.clone()
        filt.step(found(t))
        out.append({i: p.grad.clone() for i, p in enumerate(params) if p.grad is not None})
    return out


def assert_steps_close(actual, expected, tol):
    assert len(actual) == len(expected)
    for t, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys(), f"step {t}"
        for i in a:
            torch.testing.assert_close(a[i].double(), e[i], rtol=tol, atol=tol, msg=f"step {t}, param {i}")


def snapshot(filt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for p, st in filt.state.items()}


def assert_bit_identical(before, filt):
    """Every state tensor unchanged to the bit; the host's attempt counter (MA) advanced by one."""
    after = snapshot(filt)
    assert before.keys() == after.keys()
    for key, st in before.items():
        for name, value in st.items():
            new = after[key][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == new.dtype and value.shape == new.shape
                # compare raw bits: catches NaN, and -0.0 turning into +0.0
                assert torch.equal(value.view(-1).view(torch.uint8), new.view(-1).view(torch.uint8)), name
            else:
                assert name == "attempts" and new == value + 1, name


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]) if isinstance(value, torch.Tensor) else value == b[name], name


ZERO = lambda t: torch.tensor(0.0)  # noqa: E731  found_inf given, never set


# -- EMA ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("found", [lambda t: None, ZERO], ids=["plain", "found_inf=0"])
def test_ema_matches_reference_over_20_steps_with_missing_gradients(found):
    schedule = random_schedule(20)
    params = make_params()
    filt = EMAFilter(params, alpha=0.9, gain=1.5)
    actual = run(filt, params, schedule, found)
    expected, mu = reference_ema(schedule, alpha=0.9, gain=1.5)
    assert_steps_close(actual, expected, 1e-6)
    for i, p in enumerate(params):
        torch.testing.assert_close(filt.state[p]["mu"].double(), mu[i], rtol=1e-6, atol=1e-6)


def test_ema_first_step_leaves_gradient_unchanged_and_stores_a_copy():
    p = torch.nn.Parameter(torch.zeros(4, 5))
    g = torch.randn(4, 5)
    p.grad = g.clone()
    filt = EMAFilter([p], alpha=0.9, gain=2.0)
    filt.step()
    assert torch.equal(p.grad, g)
    mu = filt.state[p]["mu"]
    assert mu.data_ptr() != p.grad.data_ptr()
    p.grad.mul_(10)
    assert torch.equal(mu, g)


def test_ema_skipped_first_step_makes_the_next_step_the_first():
    p = torch.nn.Parameter(torch.zeros(6))
    filt = EMAFilter([p], alpha=0.9, gain=2.0)
    p.grad = torch.full((6,), math.nan)
    filt.step(torch.tensor(1.0))
    g = torch.randn(6)
    p.grad = g.clone()
    filt.step(torch.tensor(0.0))
    assert torch.equal(p.grad, g)
    assert torch.equal(filt.state[p]["mu"], g)


@pytest.mark.parametrize("found", [lambda t: None, ZERO], ids=["plain", "found_inf=0"])
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_float32_state_of_bfloat16_gradients_matches_reference(kind, found):
    schedule = random_schedule(8, dtype=torch.bfloat16, holes=False)
    params = make_params(torch.bfloat16)
    if kind == "ema":
        filt = EMAFilter(params, alpha=0.8, gain=0.5, dtype=torch.float32)
        expected, mu = reference_ema(schedule, alpha=0.8, gain=0.5)
    else:
        filt = MAFilter(params, window=3, gain=0.5, dtype=torch.float32)
        expected = reference_ma(schedule, window=3, gain=0.5)
    actual = run(filt, params, schedule, found)
    for i, p in enumerate(params):
        assert p.grad.dtype == torch.bfloat16
        if kind == "ema":
            assert filt.state[p]["mu"].dtype == torch.float32
            torch.testing.assert_close(filt.state[p]["mu"].double(), mu[i], rtol=1e-6, atol=1e-6)
        else:
            assert filt.state[p]["sum"].dtype == torch.float32
            window_sum = sum(schedule[t][i].double() for t in range(5, 8))
            torch.testing.assert_close(filt.state[p]["sum"].double(), window_sum, rtol=1e-6, atol=1e-6)
        # the filtered gradient is computed in float32 and rounded once to bfloat16
        for t in range(8):
            torch.testing.assert_close(actual[t][i].double(), expected[t][i].to(torch.bfloat16).double(),
                                       rtol=8e-3, atol=1e-6)


# -- MA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("found", [lambda t: None, ZERO], ids=["plain", "found_inf=0"])
def test_ma_matches_explicit_mean_of_last_window_over_60_steps(found):
    schedule = random_schedule(60)
    params = make_params()
    filt = MAFilter(params, window=7, gain=3.0)
    actual = run(filt, params, schedule, found)
    assert_steps_close(actual, reference_ma(schedule, window=7, gain=3.0), 1e-5)


def test_ma_leaves_gradients_unchanged_until_window_gradients_seen():
    schedule = random_schedule(7, holes=False)
    params = make_params()
    filt = MAFilter(params, window=7, gain=3.0)
    actual = run(filt, params, schedule)
    for t in range(6):
        for i in actual[t]:
            assert torch.equal(actual[t][i], schedule[t][i])
    # the 7th gradient is the first to be changed: by gain * mean of all seven
    for i in actual[6]:
        mean = torch.stack([schedule[t][i] for t in range(7)]).mean(0)
        torch.testing.assert_close(actual[6][i], schedule[6][i] + 3.0 * mean)


def test_ma_window_one_adds_gain_times_the_gradient_itself():
    p = torch.nn.Parameter(torch.zeros(5))
    filt = MAFilter([p], window=1, gain=2.0)
    for _ in range(3):
        g = torch.randn(5)
        p.grad = g.clone()
        filt.step()
        torch.testing.assert_close(p.grad, 3 * g)


def test_ma_running_sum_stays_within_1e6_of_exact_sum():
    p = torch.nn.Parameter(torch.zeros(2000))
    filt = MAFilter([p], window=10, gain=1.0)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(95):
        p.grad = torch.randn(2000, generator=gen)
        filt.step()
        st = filt.state[p]
        exact = st["ring"].double().sum(0)
        worst = max(worst, ((st["sum"].double() - exact).norm() / exact.norm()).item())
    assert worst < 1e-6


# -- non-finite steps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: EMAFilter(ps, alpha=0.9, gain=2.0),
                                  lambda ps: MAFilter(ps, window=4, gain=2.0)], ids=["ema", "ma"])
@pytest.mark.parametrize("steps_before", [3, 6])
def test_found_inf_step_leaves_all_state_bit_identical(make, steps_before):
    params = make_params()
    filt = make(params)
    run(filt, params, random_schedule(steps_before, holes=False), ZERO)
    # plant a negative zero: a careless update (x + 0.0) would flip its sign bit
    for st in filt.state.values():
        for name in ("mu", "sum"):
            if name in st:
                st[name].view(-1)[0] = -0.0
    before = snapshot(filt)
    for i, p in enumerate(params):
        p.grad = torch.randn(SHAPES[i])
        p.grad.view(-1)[0] = math.nan if i % 2 else math.inf
    filt.step(torch.tensor(1.0))
    assert_bit_identical(before, filt)


@pytest.mark.parametrize("make", [lambda ps: EMAFilter(ps, alpha=0.9, gain=1.5),
                                  lambda ps: MAFilter(ps, window=4, gain=1.5)], ids=["ema", "ma"])
def test_found_inf_zero_gives_the_same_bits_as_no_found_inf(make):
    schedule = random_schedule(20)
    plain_params, guarded_params = make_params(), make_params()
    plain, guarded = make(plain_params), make(guarded_params)
    expected = run(plain, plain_params, schedule)
    actual = run(guarded, guarded_params, schedule, ZERO)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys() and all(torch.equal(a[i], e[i]) for i in a)
    for p, q in zip(plain_params, guarded_params):
        assert_same_state(plain.state[p], guarded.state[q])


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_skipped_steps_are_left_out_whether_later_steps_pass_found_inf_or_not(kind):
    schedule = random_schedule(16)
    skipped = {2, 5, 6, 12}
    modes = ["plain", "zero", "plain", "zero"]  # cycles steps without and with found_inf
    params = make_params()
    filt = EMAFilter(params, alpha=0.8, gain=1.0) if kind == "ema" else MAFilter(params, window=3, gain=1.0)
    kept, actual = [], []
    for t, grads in enumerate(schedule):
        for i, p in enumerate(params):
            g = grads.get(i)
            p.grad = None if g is None else g.clone()
            if t in skipped and p.grad is not None:
                p.grad.fill_(math.nan)
        if t in skipped:
            filt.step(torch.tensor(1.0))
            continue
        filt.step(None if modes[t % 4] == "plain" else torch.tensor(0.0))
        kept.append(grads)
        actual.append({i: p.grad.clone() for i, p in enumerate(params) if p.grad is not None})
    expected = (reference_ema(kept, 0.8, 1.0)[0] if kind == "ema" else reference_ma(kept, 3, 1.0))
    assert_steps_close(actual, expected, 1e-5)


# -- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("make", [lambda ps: EMAFilter(ps, alpha=0.9, gain=2.0),
                                  lambda ps: MAFilter(ps, window=4, gain=2.0)], ids=["ema", "ma"])
def test_state_dict_round_trip_mid_stream_continues_identically(make, named):
    schedule = random_schedule(14)
    params = make_params()
    wrap = (lambda ps: [(f"p{i}", p) for i, p in enumerate(ps)]) if named else (lambda ps: ps)
    filt = make(wrap(params))
    run(filt, params, schedule[:6])
    buffer = io.BytesIO()
    torch.save(filt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    fresh_params = make_params()
    fresh = make(wrap(fresh_params))
    fresh.load_state_dict(saved)
    continued = run(filt, params, schedule[6:])
    resumed = run(fresh, fresh_params, schedule[6:])
    for a, b in zip(continued, resumed):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[i], b[i]) for i in a)
    for p, q in zip(params, fresh_params):
        assert_same_state(filt.state[p], fresh.state[q])


def test_load_state_dict_copies_instead_of_aliasing():
    params = make_params()
    filt = EMAFilter(params, alpha=0.9, gain=2.0)
    run(filt, params, random_schedule(2, holes=False))
    sd = filt.state_dict()
    fresh = EMAFilter(make_params(), alpha=0.9, gain=2.0)
    fresh.load_state_dict(sd)
    for st in fresh.state.values():
        assert all(st["mu"].data_ptr() != other["mu"].data_ptr() for other in filt.state.values())


def test_load_state_dict_rejects_other_filter_kind_and_window():
    params = make_params()
    ma = MAFilter(params, window=4, gain=1.0)
    run(ma, params, random_schedule(2, holes=False))
    with pytest.raises(ValueError, match="'MAFilter' filter state"):
        EMAFilter(make_params(), alpha=0.9, gain=1.0).load_state_dict(ma.state_dict())
    with pytest.raises(ValueError, match="--window 4"):
        MAFilter(make_params(), window=5, gain=1.0).load_state_dict(ma.state_dict())


# -- memory ---------------------------------------------------------------------------------------------
N = sum(math.prod(s) for s in SHAPES)


@pytest.mark.parametrize("dtype, param_dtype, per_param", [
    (torch.float32, torch.float32, 4), (torch.bfloat16, torch.float32, 2),
    (None, torch.float64, 8), (None, torch.bfloat16, 2)])
def test_ema_nbytes_is_one_parameter_sized_tensor_in_its_dtype(dtype, param_dtype, per_param):
    params = make_params(param_dtype)
    filt = EMAFilter(params, alpha=0.9, gain=1.0, dtype=dtype)
    assert filt.nbytes == 0
    run(filt, params, random_schedule(2, dtype=param_dtype, holes=False))
    assert filt.nbytes == per_param * N


@pytest.mark.parametrize("dtype, param_dtype, per_param", [
    (torch.float32, torch.float32, 4), (None, torch.float64, 8), (torch.bfloat16, torch.float32, 2)])
def test_ma_nbytes_is_window_plus_one_parameter_sized_tensors(dtype, param_dtype, per_param):
    params = make_params(param_dtype)
    filt = MAFilter(params, window=5, gain=1.0, dtype=dtype)
    run(filt, params, random_schedule(2, dtype=param_dtype, holes=False))
    assert filt.nbytes == (5 + 1) * per_param * N


# -- diagnostics ----------------------------------------------------------------------------------------
def test_ratio_is_nan_before_the_filter_acts_then_mu_norm_over_raw_gradient_norm():
    params = make_params()
    filt = EMAFilter(params, alpha=0.5, gain=2.0)
    schedule = random_schedule(3, holes=False)
    run(filt, params, schedule[:1])
    assert torch.isnan(filt.ratio())
    run(filt, params, schedule[1:])
    _, mu = reference_ema(schedule, alpha=0.5, gain=2.0)
    mu_norm = torch.cat([m.flatten() for m in mu.values()]).norm()
    g_norm = torch.cat([g.double().flatten() for g in schedule[-1].values()]).norm()
    ratio = filt.ratio()
    assert ratio.dim() == 0
    torch.testing.assert_close(ratio.double(), mu_norm / g_norm, rtol=1e-5, atol=0)


def test_ma_ratio_uses_the_window_mean():
    params = make_params()
    filt = MAFilter(params, window=3, gain=2.0)
    schedule = random_schedule(3, holes=False)
    run(filt, params, schedule[:2])
    assert torch.isnan(filt.ratio())
    run(filt, params, schedule[2:])
    mean = torch.cat([torch.stack([s[i] for s in schedule]).mean(0).flatten() for i in range(len(SHAPES))])
    raw = torch.cat([schedule[-1][i].flatten() for i in range(len(SHAPES))])
    torch.testing.assert_close(filt.ratio(), mean.norm() / raw.norm(), rtol=1e-5, atol=0)


# -- construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda ps: EMAFilter(ps, alpha=1.5, gain=1.0), "--alpha must be in [0, 1) for the EMA filter (got 1.5)"),
    (lambda ps: EMAFilter(ps, alpha=1.0, gain=1.0), "--alpha must be in [0, 1) for the EMA filter (got 1.0)"),
    (lambda ps: EMAFilter(ps, alpha=0.9, gain=-1), "--gain must be >= 0 (got -1)"),
    (lambda ps: MAFilter(ps, window=5, gain=-1), "--gain must be >= 0 (got -1)"),
    (lambda ps: MAFilter(ps, window=0, gain=1.0), "--window must be >= 1 (got 0)"),
])
def test_constructor_rejects_bad_hyperparameters_naming_the_flag(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(make_params())


def test_filters_are_not_optimizers_so_lr_schedulers_refuse_them():
    filt = EMAFilter(make_params(), alpha=0.9, gain=1.0)
    assert isinstance(filt, GradFilter) and not isinstance(filt, torch.optim.Optimizer)
    with pytest.raises(TypeError, match="not an Optimizer"):
        torch.optim.lr_scheduler.StepLR(filt, step_size=1)
    with pytest.raises((TypeError, AttributeError)):  # LambdaLR reads param_groups before checking
        torch.optim.lr_scheduler.LambdaLR(filt, lambda step: 1.0)


def test_no_filter_leaves_gradients_untouched_and_costs_nothing():
    params = make_params()
    filt = NoFilter(params)
    schedule = random_schedule(3, holes=False)
    actual = run(filt, params, schedule)
    for t, grads in enumerate(actual):
        assert all(torch.equal(grads[i], schedule[t][i]) for i in grads)
    assert filt.nbytes == 0
    assert torch.isnan(filt.ratio())
    filt.load_state_dict(filt.state_dict())


# -- compiled path, and the per-tensor kernel it compiles run eagerly --------------------------------------
@pytest.mark.parametrize("path", [pytest.param("compiled", marks=pytest.mark.slow), "per-tensor eager"])
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_compiled_and_per_tensor_steps_equal_the_foreach_step(kind, path):
    schedule = random_schedule(9, holes=False)

    def build(ps, other):
        options = dict(compile=path == "compiled", foreach=False) if other else {}
        if kind == "ema":
            return EMAFilter(ps, alpha=0.9, gain=2.0, **options)
        return MAFilter(ps, window=3, gain=2.0, **options)

    skip = 5  # with window 3 this is also an MA re-summation step (the 6th attempt)

    def found(t):  # steps without found_inf, then with it, one of them skipped
        return None if t < 4 else torch.tensor(1.0 if t == skip else 0.0)

    eager_params, compiled_params = make_params(), make_params()
    eager, compiled = build(eager_params, False), build(compiled_params, True)
    assert compiled.compile_error is None
    for t, grads in enumerate(schedule):
        if t == skip:
            for g in grads.values():
                g.view(-1)[0] = math.nan
        before = snapshot(compiled)
        a = run(eager, eager_params, [grads], lambda _: found(t))
        b = run(compiled, compiled_params, [grads], lambda _: found(t))
        if t == skip:
            assert_bit_identical(before, compiled)
        else:
            for i in a[0]:
                torch.testing.assert_close(b[0][i], a[0][i], rtol=1e-6, atol=1e-6)
    for p, q in zip(eager_params, compiled_params):
        for name, value in eager.state[p].items():
            other = compiled.state[q][name]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-6)
            else:
                assert value == other
