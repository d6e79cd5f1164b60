import json
import math

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from hlb_gpt.cli import main
from hlb_gpt.compare import COLUMNS, Comparison, Group, Metric, PairedTest, Span, compare, load_runs
from hlb_gpt.config import RunConfig
from hlb_gpt.plots import BETTER_COLOR, UNCLEAR_COLOR, WORSE_COLOR, forest_figure, plot

from test_compare import families  # noqa: F401 (a fixture: four configurations, raw p 0.01 to 0.04)


def group(label, test=None, baseline="baseline", is_baseline=False):
    return Group(label, {}, [], test=test, baseline=baseline, is_baseline=is_baseline)


def comparison(groups, metric="final", column="val_loss"):
    return Comparison(Metric(metric), Span("all"), COLUMNS[column], groups, [])


# In the table's order (best first), with hand-set paired tests; `p_holm` is the adjusted p-value colours follow.
ROWS = [
    group("ema α0.9 g0.1", PairedTest(3, (0, 1, 2), mean_diff=-0.06, ci_low=-0.09, ci_high=-0.03, p_value=0.01,
                                      p_holm=0.03)),
    group("ema α0.9 g1", PairedTest(3, (0, 1, 2), mean_diff=-0.05, ci_low=-0.09, ci_high=-0.01, p_value=0.03,
                                    p_holm=0.06)),  # an interval clear of 0, but not significant after Holm
    group("baseline", is_baseline=True, baseline="baseline"),
    group("ema α0.5 g1", PairedTest(1, (0,), mean_diff=-0.04)),
    group("ema α0.98 g2", PairedTest(4, (0, 1, 2, 3), mean_diff=0.01, ci_low=-0.02, ci_high=0.04, p_value=0.4,
                                     p_holm=0.4)),
    group("ma w100 g5", PairedTest(3, (0, 1, 2), mean_diff=0.15, ci_low=0.07, ci_high=0.23, p_value=0.02,
                                   p_holm=0.04)),
    group("ema α0.6 g1", PairedTest(0, ())),
    group("ema α0.99 g50", PairedTest(3, (0, 1, 2))),  # a diverged run: the difference is infinite
    group("grokadamw α0.98 g2 depth=8", None, baseline=None),
]
SHOWN = [g.label for g in ROWS if not g.is_baseline]


@pytest.fixture
def ax():
    return forest_figure(comparison(ROWS)).axes[0]


def points(ax):
    """label -> (x, y, (interval low, high) or None, colour) of each error bar."""
    out = {}
    for c in ax.containers:
        line, _, bars = c.lines
        interval = tuple(bars[0].get_segments()[0][:, 0]) if bars else None
        out[c.get_label()] = (line.get_xdata()[0], line.get_ydata()[0], interval, to_rgba(line.get_color()))
    return out


def test_one_row_per_configuration_in_the_table_s_order_without_the_baseline(ax):
    assert [t.get_text() for t in ax.get_yticklabels()] == SHOWN
    low, high = ax.get_ylim()
    assert low > high  # the first row (the best) on top


def test_each_paired_difference_is_a_point_on_its_row_with_its_95_percent_interval(ax):
    p = points(ax)
    assert sorted(p) == sorted(["ema α0.9 g0.1", "ema α0.9 g1", "ema α0.5 g1", "ema α0.98 g2", "ma w100 g5"])
    x, y, interval, _ = p["ema α0.9 g0.1"]
    assert (x, y) == (-0.06, 0) and interval == pytest.approx((-0.09, -0.03))
    assert p["ma w100 g5"][:3] == (0.15, 4, pytest.approx((0.07, 0.23)))
    assert p["ema α0.5 g1"][1:3] == (2, None)  # one pair: the difference, no interval


def test_a_vertical_line_marks_no_difference(ax):
    zero = [line for line in ax.get_lines() if list(line.get_xdata()) == [0, 0]]
    assert len(zero) == 1 and ax.get_xlim()[0] < 0 < ax.get_xlim()[1]


def test_each_row_says_its_pairs_or_why_it_has_no_difference(ax):
    texts = [t.get_text() for t in ax.texts]
    assert texts == [
        "-0.0600 [-0.0900, -0.0300]   n = 3 pairs",
        "-0.0500 [-0.0900, -0.0100]   n = 3 pairs",
        "-0.0400   n = 1 pair: no interval",
        "+0.0100 [-0.0200, +0.0400]   n = 4 pairs",
        "+0.1500 [+0.0700, +0.2300]   n = 3 pairs",
        "no pairs (no seed shared with the baseline)",
        "n = 3 pairs: infinite, no difference",
        "no baseline",
    ]
    assert [t.get_position()[1] for t in ax.texts] == list(range(len(SHOWN)))


def test_colour_says_whether_the_holm_adjusted_test_finds_the_difference_better_or_worse(ax):
    colors = {label: c for label, (*_, c) in points(ax).items()}
    assert colors["ema α0.9 g0.1"] == to_rgba(BETTER_COLOR)
    assert colors["ma w100 g5"] == to_rgba(WORSE_COLOR)
    assert colors["ema α0.98 g2"] == colors["ema α0.5 g1"] == to_rgba(UNCLEAR_COLOR)


def test_a_difference_significant_before_adjustment_but_not_after_is_not_coloured(ax):
    # Its 95% interval lies wholly below 0 (raw p 0.03), but its Holm-adjusted p is 0.06.
    assert {label: c for label, (*_, c) in points(ax).items()}["ema α0.9 g1"] == to_rgba(UNCLEAR_COLOR)


def test_a_row_without_an_adjusted_p_value_is_not_coloured():
    # Identical differences: a degenerate interval at -0.05 and no test, so no decision.
    rows = [group("ema α0.8 g0.5", PairedTest(3, (0, 1, 2), mean_diff=-0.05, ci_low=-0.05, ci_high=-0.05))]
    ax = forest_figure(comparison(rows)).axes[0]
    assert points(ax)["ema α0.8 g0.5"][3] == to_rgba(UNCLEAR_COLOR)


def test_the_legend_says_the_colours_are_the_holm_adjusted_decision(ax):
    [legend] = ax.figure.legends  # below the axes, beside nothing it could hide
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["better: Holm-adjusted p < 0.05", "worse: Holm-adjusted p < 0.05",
                     "not significant after Holm, or no test"]
    assert [to_rgba(h.get_color()) for h in legend.legend_handles] == [
        to_rgba(BETTER_COLOR), to_rgba(WORSE_COLOR), to_rgba(UNCLEAR_COLOR)]

def test_the_title_names_the_metric_and_the_column(ax):
    assert ax.get_title() == ("final val_loss, all evaluations\n"
                              "paired difference to the baseline: mean and 95% t interval (unadjusted)\n"
                              "colour: Holm-adjusted p < 0.05 within each baseline's family")
    assert "negative is better" in ax.get_xlabel()


def test_rows_paired_with_different_baselines_name_theirs():
    rows = [group("ema α0.9 g2 depth=4", PairedTest(1, (0,), mean_diff=0.1), baseline="baseline depth=4"),
            group("ema α0.9 g2 depth=8", PairedTest(1, (0,), mean_diff=0.2), baseline="baseline depth=8")]
    ax = forest_figure(comparison(rows)).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ema α0.9 g2 depth=4 vs baseline depth=4",
                                                            "ema α0.9 g2 depth=8 vs baseline depth=8"]


def test_plot_writes_the_forest_only_when_a_configuration_has_a_paired_difference(tmp_path):
    none = [g for g in ROWS if g.test is None or g.test.mean_diff is None]
    assert "forest.png" not in [p.name for p in plot(comparison(none), tmp_path / "none")]
    path = next(p for p in plot(comparison(ROWS), tmp_path / "some") if p.name == "forest.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- from run folders

FINAL = {"baseline": [3.60, 3.70, 3.50], "ema": [3.50, 3.62, 3.41]}  # differences -0.10, -0.08, -0.09


def write_run(folder, settings, final, seed):
    folder.mkdir(parents=True)
    config = {**RunConfig(dataset="mini", tokenizer="bytes", preset="tiny", epochs=2.0, seed=seed, device="cpu",
                          **settings).to_dict(), "resolved_device": "cpu"}
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": 1.0, "step": 100, "val_loss": 4.0}, {"epoch": 2.0, "step": 200, "val_loss": final}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "error": None, "epochs": 2.0}))


@pytest.fixture
def sweep(tmp_path):
    for seed in range(3):
        write_run(tmp_path / "sweep" / f"baseline-s{seed}", {}, FINAL["baseline"][seed], seed)
        write_run(tmp_path / "sweep" / f"ema-s{seed}", dict(grokfast=True, alpha=0.9, gain=2.0), FINAL["ema"][seed],
                  seed)
    return tmp_path / "sweep"


def test_the_forest_of_real_runs_shows_the_paired_t_interval(sweep):
    ax = forest_figure(compare(load_runs([sweep])[0], "final", "all")).axes[0]
    d = np.array(FINAL["ema"]) - np.array(FINAL["baseline"])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    x, y, interval, _ = points(ax)["ema α0.9 g2"]
    assert x == pytest.approx(-0.09) and interval == pytest.approx((-0.09 - half, -0.09 + half))
    assert [t.get_text() for t in ax.texts] == ["-0.0900 [-0.1148, -0.0652]   n = 3 pairs"]


def test_compare_command_writes_the_forest_plot(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(sweep), "--plot", str(tmp_path / "plots")])
    assert exc.value.code == 0
    assert (tmp_path / "plots" / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'plots' / 'forest.png'}" in capsys.readouterr().err


def test_the_forest_of_real_runs_colours_only_what_survives_holm(families):
    ax = forest_figure(compare(load_runs([families])[0], "final", "all")).axes[0]
    colors = {label.removesuffix(" depth=4"): c for label, (*_, c) in points(ax).items()}
    # Raw p 0.01 (Holm 0.04) stays coloured; raw 0.02, 0.03 and 0.04 (Holm 0.06) have intervals clear of 0
    # but are grey; the depth=2 row is a family of one, raw p 0.03 = Holm 0.03.
    assert colors["ma w100 g5"] == to_rgba(WORSE_COLOR)
    assert colors["ema α0.9 g0.1"] == colors["ema α0.9 g1"] == colors["ema α0.98 g2"] == to_rgba(UNCLEAR_COLOR)
    assert colors["ema α0.9 g1 depth=2"] == to_rgba(BETTER_COLOR)
    intervals = {label: interval for label, (_, _, interval, _) in points(ax).items()}
    assert all(high < 0 for label, (low, high) in intervals.items() if label.startswith("ema"))
