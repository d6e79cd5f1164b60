import json
import math

import numpy as np
import pytest

from hlb_gpt.cli import main
from hlb_gpt.compare import compare, load_runs
from hlb_gpt.config import RunConfig
from hlb_gpt.resample import MAX_POINTS, epoch_grid, resample_curve

INF = math.inf

# Run A is evaluated at epochs 0.5, 1, 2; run B at 1 and 3. Every expected point below is worked out by hand.
A = ([0.5, 1.0, 2.0], [4.0, 3.0, 1.0])
B = ([1.0, 3.0], [5.0, 2.0])


# ----------------------------------------------------------------------------------------------- the curve


def test_the_grid_runs_from_zero_to_the_longest_run_s_last_epoch():
    assert list(epoch_grid([2.0, 3.0], 4)) == [0.0, 1.0, 2.0, 3.0]
    assert list(epoch_grid([2.0, 3.0], 7)) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def test_points_on_evaluations_keep_them_and_points_before_the_first_hold_its_value():
    grid = epoch_grid([2.0, 3.0], 4)  # 0, 1, 2, 3
    epochs, values = resample_curve(*A, grid)
    assert list(epochs) == [0.0, 1.0, 2.0] and list(values) == [4.0, 3.0, 1.0]  # epoch 3 is past A's last
    epochs, values = resample_curve(*B, grid)
    # 0: before B's first evaluation, held at 5; 2: halfway from (1, 5) to (3, 2)
    assert list(epochs) == [0.0, 1.0, 2.0, 3.0] and list(values) == [5.0, 5.0, 3.5, 2.0]


def test_points_between_evaluations_lie_on_the_line_joining_them():
    grid = epoch_grid([2.0, 3.0], 5)  # 0, 0.75, 1.5, 2.25, 3
    epochs, values = resample_curve(*A, grid)
    # 0.75: halfway from (0.5, 4) to (1, 3); 1.5: halfway from (1, 3) to (2, 1); 2.25 is past A's last (2)
    assert list(epochs) == [0.0, 0.75, 1.5]
    assert list(values) == pytest.approx([4.0, 3.5, 2.0])
    epochs, values = resample_curve(*B, grid)
    # slope -1.5 per epoch from (1, 5): 1.5 -> 4.25, 2.25 -> 3.125
    assert list(epochs) == [0.0, 0.75, 1.5, 2.25, 3.0]
    assert list(values) == pytest.approx([5.0, 5.0, 4.25, 3.125, 2.0])


def test_points_after_the_last_evaluation_are_left_out():
    epochs, values = resample_curve([1.0, 2.0], [3.0, 2.0], epoch_grid([4.0], 9))
    assert list(epochs) == [0.0, 0.5, 1.0, 1.5, 2.0] and list(values) == [3.0, 3.0, 3.0, 2.5, 2.0]


def test_a_bad_evaluation_makes_the_points_beside_it_worst_but_keeps_the_good_evaluations_around_it():
    grid = epoch_grid([4.0], 9)  # every half epoch
    for bad in (INF, math.nan):
        epochs, values = resample_curve([1.0, 2.0, 3.0, 4.0], [3.0, bad, 2.0, 1.5], grid)
        assert list(values) == [3.0, 3.0, 3.0, INF, INF, INF, 2.0, 1.75, 1.5]


def test_a_higher_is_better_column_uses_its_own_worst_value():
    epochs, values = resample_curve([1.0, 2.0], [0.5, math.nan], epoch_grid([2.0], 5), worst=-INF)
    assert list(values) == [0.5, 0.5, 0.5, -INF, -INF]


def test_a_diverged_run_is_worst_from_where_it_stopped_to_the_end_of_the_grid():
    grid = epoch_grid([4.0], 9)
    # evaluated at 1 and 2, stopped at 2.5: compare adds the worst value there
    epochs, values = resample_curve([1.0, 2.0, 2.5], [3.0, 2.0, INF], grid, diverged=True)
    assert list(epochs) == list(grid)
    assert list(values) == [3.0, 3.0, 3.0, 2.5, 2.0, INF, INF, INF, INF]
    # stopped at its last evaluation's epoch: that evaluation was taken before it stopped, so it counts
    epochs, values = resample_curve([1.0, 2.0, 2.0], [3.0, 2.0, INF], grid, diverged=True)
    assert list(values) == [3.0, 3.0, 3.0, 2.5, 2.0, INF, INF, INF, INF]


def test_an_empty_curve_has_no_points():
    epochs, values = resample_curve([], [], epoch_grid([1.0], 3))
    assert epochs.size == 0 and values.size == 0


@pytest.mark.parametrize("n", [1, 0, -3])
def test_fewer_than_two_grid_points_are_refused(n):
    with pytest.raises(ValueError, match="N >= 2"):
        epoch_grid([1.0], n)


def test_epochs_out_of_order_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        resample_curve([2.0, 1.0], [1.0, 2.0], epoch_grid([2.0], 3))


# ----------------------------------------------------------------------------------------------- the rules, point by point


def value_at(x, epochs, values, worst):
    """The module's rules for one grid point, written as a loop over points would apply them: the reference the
    vectorised `resample_curve` is held to."""
    right = int(np.searchsorted(epochs, x, side="left"))  # the first evaluation at or after x
    if right < len(epochs) and epochs[right] == x:  # on an evaluation (of equal epochs, the first)
        return float(values[right]) if math.isfinite(values[right]) else worst
    if right == 0:  # before the first evaluation: held
        return float(values[0]) if math.isfinite(values[0]) else worst
    if right == len(epochs):  # past the last evaluation: only a diverged run gets here
        return worst
    a, b = values[right - 1], values[right]
    if not (math.isfinite(a) and math.isfinite(b)):
        return worst
    t = (x - epochs[right - 1]) / (epochs[right] - epochs[right - 1])
    return float(a + t * (b - a))


def point_by_point(epochs, values, grid, worst=INF, diverged=False):
    epochs, values, grid = (np.asarray(a, dtype=float) for a in (epochs, values, grid))
    if epochs.size == 0:
        return grid[:0], np.empty(0)
    reached = grid if diverged else grid[grid <= epochs[-1]]
    with np.errstate(all="ignore"):
        return reached, np.array([value_at(x, epochs, values, worst) for x in reached], dtype=float)


def random_curve(rng):
    """Epochs ascending, some repeated, some on grid points; values with NaN, +-inf and huge numbers among them."""
    n = int(rng.integers(1, 12))
    on_grid = rng.integers(0, 40, n) / 8  # grid points of a 0..5 grid of 41 points
    anywhere = rng.uniform(0, 6, n)
    epochs = np.sort(np.where(rng.random(n) < 0.5, on_grid, anywhere))
    if n > 2 and rng.random() < 0.3:
        epochs[-1] = epochs[-2]  # a diverged run's worst-value row at its last evaluation's epoch
    values = rng.normal(3.0, 1.0, n)
    for bad in (math.nan, INF, -INF, 1e308, -1e308):
        values[rng.random(n) < 0.1] = bad
    return epochs, values


def test_the_vectorised_curve_equals_the_rules_applied_point_by_point_on_random_curves():
    rng = np.random.default_rng(0)
    for trial in range(400):
        epochs, values = random_curve(rng)
        grid = epoch_grid([5.0], 41) if trial % 2 else epoch_grid([rng.uniform(0.1, 7.0)], int(rng.integers(2, 200)))
        for worst in (INF, -INF):
            for diverged in (False, True):
                expected = point_by_point(epochs, values, grid, worst, diverged)
                got = resample_curve(epochs, values, grid, worst, diverged)
                assert np.array_equal(got[0], expected[0]), (epochs, values)
                assert np.array_equal(got[1], expected[1], equal_nan=True), (epochs, values, got[1], expected[1])


@pytest.mark.parametrize("epochs, values", [
    ([2.0, 3.0], [4.0, 3.0]),                      # points held before the first evaluation
    ([0.0, 1.0], [4.0, 3.0]),                      # points left out after the last
    ([1.0, 2.0, 3.0, 4.0], [3.0, INF, 2.0, 1.5]),  # a bad value widens to its neighbours
    ([1.0, 2.0, 3.0, 4.0], [3.0, math.nan, 2.0, 1.5]),
    ([1.0, 2.0, 2.5], [3.0, 2.0, INF]),            # diverged after its last evaluation
    ([1.0, 2.0, 2.0], [3.0, 2.0, INF]),            # diverged at its last evaluation's epoch
    ([1.0, 1.0, 1.0], [math.nan, 2.0, 3.0]),       # equal epochs: the first wins
    ([2.5], [1.0]),                                # one evaluation
    ([2.5], [math.nan]),
    ([6.0, 7.0], [1.0, 2.0]),                      # every point before the first evaluation
    ([0.0, 4.0], [math.nan, math.nan]),            # nothing good
    ([], []),
])
@pytest.mark.parametrize("diverged", [False, True])
@pytest.mark.parametrize("worst", [INF, -INF])
def test_the_vectorised_curve_equals_the_rules_applied_point_by_point_on_edge_cases(epochs, values, diverged, worst):
    grid = epoch_grid([4.0], 17)
    expected = point_by_point(epochs, values, grid, worst, diverged)
    got = resample_curve(epochs, values, grid, worst, diverged)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1], equal_nan=True)


def test_more_grid_points_than_the_bound_are_refused():
    epoch_grid([1.0], MAX_POINTS)
    with pytest.raises(ValueError, match=f"at most {MAX_POINTS:,}"):
        epoch_grid([1.0], MAX_POINTS + 1)


# ----------------------------------------------------------------------------------------------- through compare

# The baseline is evaluated once per epoch, the filter every half epoch (100 optimizer steps per epoch).
COARSE = [1.0, 2.0, 3.0, 4.0]
FINE = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
CURVES = {
    "baseline": (COARSE, {}, [[4.0, 3.0, 2.6, 2.4], [4.2, 3.2, 2.7, 2.5]]),
    "ema": (FINE, dict(grokfast=True, alpha=0.9, gain=0.1),
            [[4.5, 3.9, 3.4, 2.9, 2.6, 2.5, 2.35, 2.3], [4.6, 4.0, 3.5, 3.0, 2.7, 2.55, 2.45, 2.4]]),
}
# The same curves on the 9-point grid 0, 0.5, ..., 4, by hand: the baseline held at 0 and 0.5, halfway between
# its evaluations at 1.5, 2.5, 3.5; the filter held at 0, then its own evaluations.
ON_GRID_9 = {
    "baseline": [[4.0, 4.0, 4.0, 3.5, 3.0, 2.8, 2.6, 2.5, 2.4], [4.2, 4.2, 4.2, 3.7, 3.2, 2.95, 2.7, 2.6, 2.5]],
    "ema α0.9 g0.1": [[4.5, 4.5, 3.9, 3.4, 2.9, 2.6, 2.5, 2.35, 2.3], [4.6, 4.6, 4.0, 3.5, 3.0, 2.7, 2.55, 2.45, 2.4]],
}


def write_run(folder, settings, epochs, values, seed, status="completed"):
    """A hand-made run folder: config.json, one metrics row per evaluation, and (with a status) summary.json."""
    folder.mkdir(parents=True)
    config = {**RunConfig(dataset="mini", tokenizer="bytes", preset="tiny", epochs=4.0, seed=seed, device="cpu",
                          **settings).to_dict(), "resolved_device": "cpu"}
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": e, "step": round(e * 100), "train_loss": v, "val_loss": v} for e, v in zip(epochs, values)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status, "error": None, "epochs": max(epochs)}))


@pytest.fixture
def cadences(tmp_path):
    root = tmp_path / "cadences"
    for name, (epochs, settings, curves) in CURVES.items():
        for seed, values in enumerate(curves):
            write_run(root / f"{name}-s{seed}", settings, epochs, values, seed)
    return root


@pytest.mark.parametrize("metric", ["final", "best", "best:2", "mean"])
@pytest.mark.parametrize("span,keep", [("all", slice(0, 9)), ("first:1", slice(0, 3)), ("last:1", slice(6, 9))])
def test_compare_applies_metrics_and_spans_to_the_hand_computed_grid(cadences, metric, span, keep):
    c = compare(load_runs([cadences])[0], metric, span, resample=9)
    for label, curves in ON_GRID_9.items():
        points = np.array(curves)[:, keep]  # first:1 is epochs 0, 0.5, 1; last:1 is epochs 3, 3.5, 4
        expected = {"final": points[:, -1], "best": points.min(axis=1),
                    "best:2": np.sort(points, axis=1)[:, :2].mean(axis=1), "mean": points.mean(axis=1)}[metric]
        assert c.group(label).values == pytest.approx(list(expected), abs=1e-12)
    assert "curves resampled onto 9 epoch points 0..4" in c.notes


def test_resampling_takes_away_the_advantage_of_evaluating_more_often(cadences):
    runs = load_runs([cadences])[0]
    # best:2 over its own 8 evaluations: (2.35 + 2.3) / 2; on the grid 0, 1, 2, 3, 4 only 2.5 and 2.3 remain
    assert compare(runs, "best:2", "all").group("ema α0.9 g0.1").values[0] == pytest.approx(2.325)
    assert compare(runs, "best:2", "all", resample=5).group("ema α0.9 g0.1").values[0] == pytest.approx(2.4)


def test_a_run_that_stopped_early_has_a_shorter_curve_and_a_note_says_so(cadences):
    write_run(cadences / "ema-s2", CURVES["ema"][1], [0.5, 1.0, 1.5, 2.0], [4.4, 3.8, 3.3, 2.8], 2, status=None)
    c = compare(load_runs([cadences])[0], "final", "all", resample=9)
    assert c.group("ema α0.9 g0.1").values[2] == 2.8  # its value at epoch 2, the last grid point it reached
    assert "curves resampled onto 9 epoch points 0..4; 1 run(s) end earlier and have fewer points" in c.notes


def test_a_diverged_run_stays_worst_to_the_end_of_the_grid(cadences):
    write_run(cadences / "ema-s2", CURVES["ema"][1], [0.5, 1.0], [4.4, 3.8], 2, status="diverged")
    c = compare(load_runs([cadences])[0], "final", "first:2", resample=9)
    assert c.group("ema α0.9 g0.1").values[2] == INF  # not its last good value, 3.8
    assert compare(load_runs([cadences])[0], "best", "all", resample=9).group("ema α0.9 g0.1").values[2] == 3.8
    assert not any("end earlier" in n for n in c.notes)


def test_compare_command_resamples_and_says_so(cadences, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(cadences), "--metric", "best:2", "--resample", "5"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    # grid 0, 1, 2, 3, 4. baseline: best two of (4.0, 4.0, 3.0, 2.6, 2.4) and (4.2, 4.2, 3.2, 2.7, 2.5) are 2.5 and
    # 2.6; the filter: of (4.5, 3.9, 2.9, 2.5, 2.3) and (4.6, 4.0, 3.0, 2.55, 2.4), 2.4 and 2.475
    assert "| baseline | 2 | 2.5500 ± 0.0707 |" in out
    assert "| ema α0.9 g0.1 | 2 | 2.4375 ± 0.0530 | -0.1125 |" in out
    assert "- curves resampled onto 5 epoch points 0..4" in out


@pytest.mark.parametrize("args,message", [
    (["--resample", "1"], "Invalid value for '--resample'"),
    (["--resample", "5", "--metric", "steps_to_target"], "--resample does not apply to --metric steps_to_target"),
])
def test_compare_command_refuses_a_bad_resample_in_one_line(cadences, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(cadences), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err.strip().splitlines()[-1]


def test_compare_command_refuses_more_points_than_the_bound_in_one_line(cadences, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(cadences), "--resample", "100000000"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and "Traceback" not in err and err.count("\n") == 1, err
    assert "--resample N must be at most 1,000,000 points (got 100,000,000)" in err
