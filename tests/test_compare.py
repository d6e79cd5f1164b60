import builtins
import csv
import errno
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from scipy import stats

from hlb_gpt.cli import main
from hlb_gpt.compare import (COLUMNS, Column, Metric, Span, compare, format_notes, format_table, group_key,
                             load_runs, parse_metric, parse_span)
from hlb_gpt.compare.statistics import bh_adjusted, holm_adjusted
from hlb_gpt.plots import curves_figure, gain_figure, plot
from hlb_gpt.config import BOOKKEEPING as BOOKKEEPING_KEYS
from hlb_gpt.config import RunConfig

MiB = 2**20
EPOCHS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # evaluations once per epoch, 100 optimizer steps per epoch
SEEDS = [0, 1, 2]

# val_loss per seed (rows) and evaluation (columns), written by hand.
CURVES = {
    "baseline": [[5.0, 4.2, 3.9, 3.7, 3.6, 3.55],
                 [5.1, 4.3, 3.95, 3.8, 3.65, 3.6],
                 [4.9, 4.1, 3.85, 3.75, 3.58, 3.5]],
    "ema α0.9 g0.1": [[4.9, 4.1, 3.8, 3.65, 3.55, 3.52],
                      [5.0, 4.25, 3.9, 3.7, 3.61, 3.57],
                      [4.8, 4.05, 3.8, 3.7, 3.54, 3.49]],
    "ema α0.99 g5": [[5.5, 4.8, 4.6, 4.7, 4.5, 4.65],
                     [5.6, 4.9, 4.5, 4.8, 4.6, 4.55],
                     [5.4, 4.7, 4.7, 4.4, 4.9, 4.6]],
    "ma w100 g5": [[5.05, 4.3, 4.0, 3.9, 3.95, 3.8],
                   [5.2, 4.4, 4.1, 3.85, 3.9, 3.88],
                   [5.0, 4.2, 3.9, 3.8, 3.7, 3.75]],
}
SETTINGS = {
    # The baselines record different, unused filter settings: they are still one configuration.
    "baseline": [dict(alpha=0.98), dict(alpha=0.9, gain=5.0), dict(filter="ma", window=7)],
    "ema α0.9 g0.1": [dict(grokfast=True, alpha=0.9, gain=0.1)] * 3,
    "ema α0.99 g5": [dict(grokfast=True, alpha=0.99, gain=5.0, window=3)] * 3,
    "ma w100 g5": [dict(grokfast=True, filter="ma", window=100, gain=5.0, alpha=0.5)] * 3,
}
# Per seed: filter bytes, peak bytes, step time.
COSTS = {
    "baseline": [(0, 400 * MiB, 0.100), (0, 410 * MiB, 0.102), (0, 390 * MiB, 0.098)],
    "ema α0.9 g0.1": [(8 * MiB, 420 * MiB, 0.110)] * 3,
    "ema α0.99 g5": [(8 * MiB, 420 * MiB, 0.105)] * 3,
    "ma w100 g5": [(16 * MiB, 430 * MiB, 0.125)] * 3,
}
FOLDER = {"baseline": "baseline", "ema α0.9 g0.1": "ema-a0.9-g0.1", "ema α0.99 g5": "ema-a0.99-g5",
          "ma w100 g5": "ma-w100-g5"}


def write_run(folder, settings, values, seed, epochs=EPOCHS, steps_per_epoch=100, costs=(0, 400 * MiB, 0.1),
              status="completed", device="cpu", planned=6.0, optimizer_bytes=8000, recorded=None):
    """A hand-made run folder; `recorded` adds or replaces fields of config.json beyond the settings (e.g. the
    data's text_sha256, resolved_precision, world_size)."""
    folder.mkdir(parents=True)
    config = {
        **RunConfig(dataset="mini", tokenizer="bytes", preset="tiny", epochs=planned, seed=seed,
                    device=device, **settings).to_dict(),
        "resolved_device": device, "n_params": 1000, "train_tokens": 10_000,
        "versions": {"hlb_gpt": "0.1.0", "torch": f"2.{seed}"},
        **(recorded or {}),
    }
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": e, "step": round(e * steps_per_epoch), "tokens": 0, "train_loss": v, "val_loss": v, "lr": 1e-3,
             "grad_norm": 1.0, "ema_ratio": None, "time_s": e, "tokens_per_s": 1.0} for e, v in zip(epochs, values)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        filter_bytes, peak, step_time = costs
        summary = {"status": status, "error": None, "epochs": max(epochs, default=0.0), "step_time_s": step_time,
                   "memory": {"params_bytes": 4000, "grads_bytes": 4000, "optimizer_bytes": optimizer_bytes,
                              "filter_bytes": filter_bytes, "peak_bytes": peak, "peak_kind": "process_peak_rss"}}
        (folder / "summary.json").write_text(json.dumps(summary))


# Per seed: bookkeeping settings that differ between runs of one configuration (a resume may change them).
BOOKKEEPING = [dict(), dict(checkpoint_every=0.5, keep_checkpoints=5),
               dict(wandb=True, wandb_project="other", data_cache="/elsewhere/cache")]


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for label, curves in CURVES.items():
        for seed, values, settings, costs in zip(SEEDS, curves, SETTINGS[label], COSTS[label]):
            write_run(root / f"{FOLDER[label]}-s{seed}", {**settings, **BOOKKEEPING[seed]}, values, seed, costs=costs)
    return root


def runs_of(*paths):
    runs, notes = load_runs(paths)
    return runs, notes


# ----------------------------------------------------------------------------------------------- expected numbers


def window_slice(window):
    """Column indices of EPOCHS inside the window, by hand: first:3 is epochs 1-3, last:2 is epochs 4-6."""
    return {"all": slice(0, 6), "first:3": slice(0, 3), "last:2": slice(3, 6)}[window]


def expected_per_run(label, metric, window):
    w = np.array(CURVES[label])[:, window_slice(window)]
    if metric == "final":
        return w[:, -1]
    if metric == "best":
        return w.min(axis=1)
    if metric == "best:2":
        return np.sort(w, axis=1)[:, :2].mean(axis=1)
    return w.mean(axis=1)


def expected_paired(label, metric, window):
    d = expected_per_run(label, metric, window) - expected_per_run("baseline", metric, window)
    n = len(d)
    sd = d.std(ddof=1)
    t = d.mean() / (sd / math.sqrt(n))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return d.mean(), d.mean() - half, d.mean() + half, 2 * stats.t.sf(abs(t), n - 1)


METRICS = ["final", "best", "best:2", "mean"]
WINDOWS = ["all", "first:3", "last:2"]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_and_window_reproduces_hand_computed_means_stds_and_paired_tests(sweep, metric, window):
    runs, _ = runs_of(sweep)
    c = compare(runs, parse_metric(metric), parse_span(window))
    assert sorted(g.label for g in c.groups) == sorted(CURVES)
    for label in CURVES:
        g = c.group(label)
        per_run = expected_per_run(label, metric, window)
        assert g.n == 3
        assert sorted(g.values) == pytest.approx(sorted(per_run), rel=1e-12)
        assert g.mean == pytest.approx(per_run.mean(), rel=1e-12)
        assert g.std == pytest.approx(per_run.std(ddof=1), rel=1e-9)
        if label == "baseline":
            assert g.is_baseline and g.test is None
            continue
        mean_diff, low, high, p = expected_paired(label, metric, window)
        assert g.test.n_pairs == 3 and g.test.seeds == (0, 1, 2)
        assert g.test.mean_diff == pytest.approx(mean_diff, rel=1e-9, abs=1e-12)
        assert g.test.ci_low == pytest.approx(low, rel=1e-9, abs=1e-12)
        assert g.test.ci_high == pytest.approx(high, rel=1e-9, abs=1e-12)
        assert g.test.p_value == pytest.approx(p, rel=1e-9, abs=1e-15)
    means = [g.mean for g in c.groups]
    assert means == sorted(means)


def test_final_over_all_epochs_matches_numbers_worked_out_on_paper(sweep):
    runs, _ = runs_of(sweep)
    c = compare(runs, Metric("final"), Span("all"))
    base, ema = c.group("baseline"), c.group("ema α0.9 g0.1")
    assert base.mean == pytest.approx(3.55, abs=1e-12) and base.std == pytest.approx(0.05, abs=1e-12)
    # differences -0.03, -0.03, -0.01: mean -0.07/3, sd 0.02/sqrt(3), so t = -3.5 with 2 degrees of freedom,
    # where the t distribution has the closed form p = 1 - |t| / sqrt(t^2 + 2).
    assert ema.test.mean_diff == pytest.approx(-0.07 / 3, abs=1e-12)
    assert ema.test.statistic == pytest.approx(-3.5, rel=1e-9)
    assert ema.test.p_value == pytest.approx(1 - 3.5 / math.sqrt(3.5**2 + 2), rel=1e-9)
    assert [g.label for g in c.groups] == ["ema α0.9 g0.1", "baseline", "ma w100 g5", "ema α0.99 g5"]


def test_filter_memory_and_step_time_are_measured_against_the_baseline(sweep):
    runs, _ = runs_of(sweep)
    c = compare(runs, Metric("final"), Span("all"))
    ema, ma, base = c.group("ema α0.9 g0.1"), c.group("ma w100 g5"), c.group("baseline")
    assert ema.filter_mb == pytest.approx(8.0) and ma.filter_mb == pytest.approx(16.0)
    assert ema.filter_pct_of_peak == pytest.approx(8 / 400 * 100)  # the baseline's mean peak is 400 MiB
    assert ma.filter_pct_of_peak == pytest.approx(16 / 400 * 100)
    assert ema.step_time_overhead_pct == pytest.approx((0.110 / 0.100 - 1) * 100)
    assert ma.step_time_overhead_pct == pytest.approx(25.0)
    assert base.filter_mb == 0 and base.step_time_overhead_pct == pytest.approx(0.0)


def test_settings_that_do_not_change_the_experiment_do_not_split_a_configuration(sweep):
    runs, _ = runs_of(sweep)
    c = compare(runs, "final", "all")
    # the baselines differ in unused alpha/gain/filter/window, every configuration's runs in bookkeeping settings
    # (checkpointing, logging, cache path) and versions; the EMA runs in window
    assert len(c.groups) == 4 and all(g.n == 3 for g in c.groups)
    assert "alpha" not in c.group("baseline").config and "window" not in c.group("ema α0.99 g5").config
    assert "alpha" not in c.group("ma w100 g5").config


def test_checkpoint_settings_do_not_split_a_configuration():
    # A run resumed under --checkpoint-every 30m records it: it trained the same experiment.
    base = {"lr": 1e-3, "checkpoint_every": 1.0, "keep_checkpoints": 2}
    resumed = {"lr": 1e-3, "checkpoint_every": "30m", "checkpoint_cadence": {"epochs": 0.0, "seconds": 1800.0},
               "keep_checkpoints": 5}
    assert group_key(base) == group_key(resumed) != group_key({**base, "lr": 2e-3})


def test_markdown_table_has_one_row_per_configuration_in_sorted_order(sweep):
    runs, _ = runs_of(sweep)
    c = compare(runs, "best:2", "last:2")
    text = format_table(c)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    rows = table[2:]  # after the header and the separator
    assert [r.split(" | ")[0][2:] for r in rows] == [g.label for g in c.groups]
    ema = next(r for r in rows if r.startswith("| ema α0.9 g0.1 "))
    g = c.group("ema α0.9 g0.1")
    assert f"{g.mean:.4f} ± {g.std:.4f}" in ema and f"{g.test.mean_diff:+.4f}" in ema and "8.0" in ema
    assert "+10.0%" in ema and "2.00%" in ema


def test_csv_output_parses_back_to_the_same_numbers(sweep):
    runs, _ = runs_of(sweep)
    c = compare(runs, "mean", "first:3")
    rows = list(csv.DictReader(io.StringIO(format_table(c, "csv"))))
    assert [r["configuration"] for r in rows] == [g.label for g in c.groups]
    for row, g in zip(rows, c.groups):
        assert int(row["n"]) == g.n and float(row["mean"]) == g.mean and float(row["std"]) == g.std
        assert row["metric"] == "mean" and row["span"] == "first:3" and row["column"] == "val_loss"
        if g.is_baseline:
            assert row["diff"] == row["p_value"] == row["pairs"] == ""
        else:
            assert float(row["diff"]) == g.test.mean_diff and float(row["p_value"]) == g.test.p_value
            assert float(row["ci_low"]) == g.test.ci_low and int(row["pairs"]) == 3
            assert float(row["filter_pct_of_peak"]) == g.filter_pct_of_peak


def test_unknown_format_is_refused_naming_the_flag(sweep):
    runs, _ = runs_of(sweep)
    with pytest.raises(ValueError, match="--format"):
        format_table(compare(runs, "final", "all"), "html")


# ----------------------------------------------------------------------------------------------- multiple comparisons


def test_holm_and_bh_adjust_four_p_values_as_worked_out_by_hand():
    # Holm: sorted p times m, m-1, ...: 0.04, 0.06, 0.06, 0.04, then never below the one before: 0.06.
    # BH: sorted p times m/rank: 0.04 each.
    assert holm_adjusted([0.01, 0.02, 0.03, 0.04]) == pytest.approx([0.04, 0.06, 0.06, 0.06], rel=1e-12)
    assert bh_adjusted([0.01, 0.02, 0.03, 0.04]) == pytest.approx([0.04, 0.04, 0.04, 0.04], rel=1e-12)
    # Unsorted, with a cap at 1. Holm: 4 * 0.001, 3 * 0.03 = 0.09, 2 * 0.04 = 0.08 -> 0.09, 0.5 -> 0.5;
    # BH: 4 * 0.001, 2 * 0.03 = 0.06 -> 0.0533 (the next one down), 4/3 * 0.04 = 0.0533, 0.5.
    assert holm_adjusted([0.04, 0.001, 0.03, 0.5]) == pytest.approx([0.09, 0.004, 0.09, 0.5], rel=1e-12)
    assert bh_adjusted([0.04, 0.001, 0.03, 0.5]) == pytest.approx([0.16 / 3, 0.004, 0.16 / 3, 0.5], rel=1e-12)
    assert list(holm_adjusted([0.3, 0.4, 0.6])) == pytest.approx([0.9, 0.9, 0.9])
    assert list(holm_adjusted([0.7, 0.8])) == [1.0, 1.0]
    assert list(holm_adjusted([0.03])) == list(bh_adjusted([0.03])) == [0.03]  # a family of one: unchanged
    assert len(holm_adjusted([])) == len(bh_adjusted([])) == 0


# Four configurations against one baseline, built to have raw p = 0.01 .. 0.04; one more against another baseline.
# Each configuration's differences are x - δ, x, x + δ: t = x sqrt(3) / δ on 2 degrees of freedom, where
# p = 1 - |t| / sqrt(t^2 + 2), so |t| = (1 - p) sqrt(2 / (1 - (1 - p)^2)).
FAMILY_BASE = [3.60, 3.70, 3.50]
FAMILY = {  # label: (settings, raw p, sign of the difference)
    "ma w100 g5": (dict(grokfast=True, filter="ma", window=100, gain=5.0), 0.01, +1),
    "ema α0.9 g0.1": (dict(grokfast=True, alpha=0.9, gain=0.1), 0.02, -1),
    "ema α0.9 g1": (dict(grokfast=True, alpha=0.9, gain=1.0), 0.03, -1),
    "ema α0.98 g2": (dict(grokfast=True, alpha=0.98, gain=2.0), 0.04, -1),
}
FAMILY_HOLM = {"ma w100 g5": 0.04, "ema α0.9 g0.1": 0.06, "ema α0.9 g1": 0.06, "ema α0.98 g2": 0.06}


def differences_with_p(p, sign, delta=0.01):
    t = (1 - p) * math.sqrt(2 / (1 - (1 - p) ** 2))
    x = sign * t * delta / math.sqrt(3)
    return [x - delta, x, x + delta]


def write_family(root, depth, configurations):
    for seed, base in enumerate(FAMILY_BASE):
        write_run(root / f"baseline-d{depth}-s{seed}", dict(depth=depth), [4.0] * 5 + [base], seed)
    for label, (settings, p, sign) in configurations.items():
        for seed, (base, d) in enumerate(zip(FAMILY_BASE, differences_with_p(p, sign))):
            write_run(root / f"{label.replace(' ', '-')}-d{depth}-s{seed}", {**settings, "depth": depth},
                      [4.0] * 5 + [base + d], seed)


@pytest.fixture
def families(tmp_path):
    """Four configurations paired with `baseline depth=4`, one with `baseline depth=2`."""
    write_family(tmp_path / "families", 4, FAMILY)
    write_family(tmp_path / "families", 2, {"ema α0.9 g1": FAMILY["ema α0.9 g1"]})
    return tmp_path / "families"


def test_holm_and_bh_are_computed_within_each_baseline_s_family(families):
    c = compare(runs_of(families)[0], "final", "all")
    for label, (_, p, _) in FAMILY.items():
        t = c.group(f"{label} depth=4").test
        assert t.p_value == pytest.approx(p, rel=1e-6)
        assert t.p_holm == pytest.approx(FAMILY_HOLM[label], rel=1e-6)
        assert t.q_bh == pytest.approx(0.04, rel=1e-6)
    alone = c.group("ema α0.9 g1 depth=2").test  # its own family of one, not a fifth test of the other
    assert alone.p_value == alone.p_holm == alone.q_bh == pytest.approx(0.03, rel=1e-6)


def test_configurations_without_a_p_value_are_not_in_the_family(sweep, tmp_path):
    write_run(tmp_path / "one" / "ema-a0.5-g1-s1", dict(grokfast=True, alpha=0.5, gain=1.0), [4.0] * 6, 1)
    for seed in SEEDS:  # identical differences: no p-value
        write_run(tmp_path / "one" / f"ema-a0.8-g0.5-s{seed}", dict(grokfast=True, alpha=0.8, gain=0.5),
                  [v + 0.25 for v in CURVES["baseline"][seed]], seed)
    c = compare(runs_of(sweep, tmp_path / "one")[0], "final", "all")
    tested = ["ema α0.9 g0.1", "ema α0.99 g5", "ma w100 g5"]
    raw = [c.group(label).test.p_value for label in tested]
    assert [c.group(label).test.p_holm for label in tested] == pytest.approx(holm_adjusted(raw))
    for label in ("ema α0.5 g1", "ema α0.8 g0.5"):
        assert c.group(label).test.p_holm is None and c.group(label).test.q_bh is None
    assert c.group("baseline").test is None


def test_the_markdown_table_shows_holm_and_bh_beside_p_and_states_the_family_under_it(families):
    c = compare(runs_of(families)[0], "final", "all")
    text = format_table(c)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| configuration"))
    cells = lambda line: [x.strip() for x in line.strip("|").split("|")]  # noqa: E731
    assert cells(header)[5:9] == ["p", "p Holm", "q BH", "pairs"]
    row = dict(zip(cells(header), cells(next(line for line in lines if line.startswith("| ema α0.9 g1 depth=4 |")))))
    assert (row["p"], row["p Holm"], row["q BH"]) == ("0.03", "0.06", "0.04")
    base = dict(zip(cells(header), cells(next(line for line in lines if line.startswith("| baseline depth=4 |")))))
    assert base["p Holm"] == base["q BH"] == "—"
    # The note on the family follows the table (after one blank line), before the other notes.
    last_row = max(i for i, line in enumerate(lines) if line.startswith("| "))
    assert lines[last_row + 1] == ""
    note = lines[last_row + 2]
    assert note.startswith("Multiple comparisons:") and "two-sided paired t-test" in note
    assert "Holm" in note and "Benjamini–Hochberg" in note
    assert "the configurations paired with one baseline that have a p-value" in note
    assert "one metric, span and column (final, all, val_loss)" in note
    assert "baseline depth=2 (1 test), baseline depth=4 (4 tests)" in note
    assert "95% CI is not adjusted" in note and "forest plot" in note


def test_the_csv_has_holm_and_bh_beside_p_a_span_column_and_the_family_note_in_the_notes(families):
    c = compare(runs_of(families)[0], "final", "all")
    text = format_table(c, "csv")
    header = text.splitlines()[0].split(",")
    assert header[header.index("p_value"):header.index("p_value") + 3] == ["p_value", "p_holm", "q_bh"]
    assert "span" in header and "window" not in header
    rows = {r["configuration"]: r for r in csv.DictReader(io.StringIO(text))}
    for label, (_, p, _) in FAMILY.items():
        row = rows[f"{label} depth=4"]
        assert float(row["p_holm"]) == c.group(f"{label} depth=4").test.p_holm
        assert float(row["p_holm"]) == pytest.approx(FAMILY_HOLM[label], rel=1e-6)
        assert float(row["q_bh"]) == pytest.approx(0.04, rel=1e-6)
        assert row["span"] == "all" and row["baseline"] == "baseline depth=4"
    assert rows["baseline depth=4"]["p_holm"] == rows["baseline depth=4"]["q_bh"] == ""
    assert "Multiple comparisons:" not in text  # the CSV is the table only: notes go to stderr
    assert format_notes(c).startswith("Multiple comparisons:")


def test_a_comparison_without_p_values_has_no_family_note(sweep, tmp_path):
    write_run(tmp_path / "one" / "baseline-s1", {}, [4.0] * 6, 1)
    write_run(tmp_path / "one" / "ema-a0.5-g1-s1", dict(grokfast=True, alpha=0.5, gain=1.0), [3.0] * 6, 1)
    c = compare(runs_of(tmp_path / "one")[0], "final", "all")
    assert "Multiple comparisons" not in format_table(c) and "Multiple comparisons" not in format_notes(c)


def test_compare_command_writes_the_family_note_to_stderr_with_csv(families, capsys):
    code, out, err = compare_main([families, "--format", "csv"], capsys)
    assert code == 0 and "p_holm" in out.splitlines()[0] and "Multiple comparisons" not in out
    assert err.startswith("Multiple comparisons:")


# ----------------------------------------------------------------------------------------------- edge cases


def test_a_configuration_without_baseline_gets_na_and_a_note_saying_why(sweep, tmp_path):
    for seed in SEEDS:
        write_run(tmp_path / "deep" / f"ema-a0.9-g0.1-d2-s{seed}", dict(grokfast=True, alpha=0.9, gain=0.1, depth=2),
                  CURVES["ema α0.9 g0.1"][seed], seed)
    runs, _ = runs_of(sweep, tmp_path / "deep")
    c = compare(runs, "final", "all")
    orphan = c.group("ema α0.9 g0.1 depth=2")
    assert orphan.baseline is None and orphan.test is None and orphan.filter_pct_of_peak is None
    assert c.group("baseline depth=4").is_baseline and c.group("ema α0.9 g0.1 depth=4").test.n_pairs == 3
    assert any("no baseline" in n and "ema α0.9 g0.1 depth=2" in n for n in c.notes)
    csv_row = next(r for r in csv.DictReader(io.StringIO(format_table(c, "csv")))
                   if r["configuration"] == "ema α0.9 g0.1 depth=2")
    assert csv_row["diff"] == csv_row["pairs"] == csv_row["baseline"] == ""
    row = next(line for line in format_table(c).splitlines() if line.startswith("| ema α0.9 g0.1 depth=2 "))
    assert row.count("n/a") >= 5


def test_identical_paired_differences_give_no_p_value_a_degenerate_interval_and_a_note(sweep, tmp_path):
    shifted = tmp_path / "shifted"
    for seed in SEEDS:
        write_run(shifted / f"ema-a0.8-g0.5-s{seed}", dict(grokfast=True, alpha=0.8, gain=0.5),
                  [v + 0.25 for v in CURVES["baseline"][seed]], seed)
    runs, _ = runs_of(sweep, shifted)
    c = compare(runs, "final", "all")
    t = c.group("ema α0.8 g0.5").test
    assert t.mean_diff == pytest.approx(0.25) and t.ci_low == t.ci_high == t.mean_diff and t.p_value is None
    assert any("ema α0.8 g0.5" in n and "identical" in n for n in c.notes)


def test_a_configuration_tied_with_the_baseline_is_listed_after_it_with_a_note(sweep, tmp_path):
    for seed in SEEDS:  # gain 0 leaves the gradient unchanged: the same numbers as the baseline
        write_run(tmp_path / "g0" / f"ema-a0.9-g0-s{seed}", dict(grokfast=True, alpha=0.9, gain=0.0),
                  CURVES["baseline"][seed], seed)
    runs, _ = runs_of(sweep, tmp_path / "g0")
    c = compare(runs, "final", "all")
    labels = [g.label for g in c.groups]
    assert labels.index("ema α0.9 g0") == labels.index("baseline") + 1
    assert c.group("ema α0.9 g0").test.mean_diff == 0 and c.group("ema α0.9 g0").test.p_value is None
    assert any("tie" in n and "baseline" in n and "ema α0.9 g0" in n for n in c.notes)


def test_one_shared_seed_gives_the_difference_but_no_interval_or_p_value(sweep, tmp_path):
    write_run(tmp_path / "one" / "ema-a0.5-g1-s1", dict(grokfast=True, alpha=0.5, gain=1.0), [4.0] * 6, 1)
    runs, _ = runs_of(sweep, tmp_path / "one")
    c = compare(runs, "final", "all")
    g = c.group("ema α0.5 g1")
    assert g.n == 1 and g.std is None
    assert g.test.n_pairs == 1 and g.test.mean_diff == pytest.approx(4.0 - 3.6)
    assert g.test.ci_low is None and g.test.p_value is None
    row = next(line for line in format_table(c).splitlines() if line.startswith("| ema α0.5 g1 "))
    assert "± n/a" in row and row.split(" | ")[4:9] == ["n/a", "n/a", "n/a", "n/a", "1"]
    assert any("ema α0.5 g1" in n and "1 pair" in n for n in c.notes)


def test_seeds_missing_on_one_side_are_left_out_of_the_pairing_with_a_note(sweep, tmp_path):
    for seed in (1, 2, 3):
        write_run(tmp_path / "other" / f"ema-a0.7-g2-s{seed}", dict(grokfast=True, alpha=0.7, gain=2.0),
                  [3.0 + seed / 10] * 6, seed)
    runs, _ = runs_of(sweep, tmp_path / "other")
    c = compare(runs, "final", "all")
    t = c.group("ema α0.7 g2").test
    assert t.seeds == (1, 2) and t.n_pairs == 2
    d = np.array([3.1 - 3.6, 3.2 - 3.5])
    assert t.mean_diff == pytest.approx(d.mean())
    assert t.p_value == pytest.approx(2 * stats.t.sf(abs(d.mean() / (d.std(ddof=1) / math.sqrt(2))), 1), rel=1e-9)
    assert any("ema α0.7 g2: paired over 2 shared seed(s)" in n for n in c.notes)


def test_a_run_without_summary_is_included_with_a_note_and_an_empty_one_is_skipped(sweep):
    (sweep / "ma-w100-g5-s2" / "summary.json").unlink()
    write_run(sweep / "ma-w100-g5-s9", SETTINGS["ma w100 g5"][0], [], 9, status=None)
    runs, notes = runs_of(sweep)
    assert len(runs) == 12
    assert any("ma-w100-g5-s2" in n and "unfinished" in n and "epoch 6" in n for n in notes)
    assert any("ma-w100-g5-s9" in n and "skipped" in n for n in notes)
    c = compare(runs, "final", "all", notes=notes)
    assert c.group("ma w100 g5").n == 3 and any("unfinished" in n for n in c.notes)
    # its costs come from the runs that recorded them
    assert c.group("ma w100 g5").filter_mb == pytest.approx(16.0)
    assert "unfinished" in format_table(c) and "unfinished" in format_notes(c)


def test_a_diverged_run_counts_as_infinite_loss_from_where_it_stopped(sweep, tmp_path):
    # it stopped after epoch 3 without writing a non-finite row (too many bad steps)
    write_run(tmp_path / "div" / "ema-a0.99-g50-s0", dict(grokfast=True, alpha=0.99, gain=50.0),
              [4.0, 3.0, 3.2], 0, epochs=[1.0, 2.0, 3.0], status="diverged")
    write_run(tmp_path / "div" / "ema-a0.99-g50-s1", dict(grokfast=True, alpha=0.99, gain=50.0),
              [4.0, 3.4, 3.3, 3.3, 3.3, 3.3], 1)
    runs, notes = runs_of(sweep, tmp_path / "div")
    assert any("ema-a0.99-g50-s0" in n and "diverged" in n for n in notes)
    final = compare(runs, "final", "all").group("ema α0.99 g50")
    assert math.inf in final.values and final.mean == math.inf and final.std is None
    assert final.test.p_value is None and final.test.mean_diff is None
    c = compare(runs, "best", "all")
    assert sorted(c.group("ema α0.99 g50").values) == [3.0, 3.3]  # the best it reached before diverging
    assert compare(runs, "final", "first:2").group("ema α0.99 g50").values == [3.0, 3.4]
    ordered = compare(runs, "final", "all")
    assert ordered.groups[-1].label == "ema α0.99 g50" and any("+inf" in n for n in ordered.notes)


def test_grokadamw_is_compared_with_the_adamw_baseline_and_its_filter_is_its_extra_optimizer_state(sweep, tmp_path):
    for seed in SEEDS:
        write_run(tmp_path / "gadam" / f"grokadamw-a0.98-g2-s{seed}",
                  dict(optimizer="grokadamw", alpha=0.98, gain=2.0, window=5, filter="ma"),
                  [v - 0.1 for v in CURVES["baseline"][seed]], seed, optimizer_bytes=8000 + 3 * MiB,
                  costs=(0, 500 * MiB, 0.12))
    runs, _ = runs_of(sweep, tmp_path / "gadam")
    g = compare(runs, "final", "all").group("grokadamw α0.98 g2")
    assert g.baseline == "baseline" and g.test.n_pairs == 3 and g.test.mean_diff == pytest.approx(-0.1)
    assert g.filter_mb == pytest.approx(3.0) and g.filter_pct_of_peak == pytest.approx(3 / 400 * 100)
    assert g.step_time_overhead_pct == pytest.approx(20.0)



def test_a_filtered_muon_run_is_compared_with_the_unfiltered_muon_run_not_with_adamw(sweep, tmp_path):
    for seed in SEEDS:
        baseline = CURVES["baseline"][seed]
        write_run(tmp_path / "muon" / f"muon-s{seed}", dict(optimizer="muon"), [v - 0.2 for v in baseline], seed)
        write_run(tmp_path / "muon" / f"muon-ema-a0.9-g0.1-s{seed}",
                  dict(optimizer="muon", grokfast=True, alpha=0.9, gain=0.1), [v - 0.25 for v in baseline], seed)
    runs, _ = runs_of(sweep, tmp_path / "muon")
    result = compare(runs, "final", "all")
    filtered = result.group("muon ema α0.9 g0.1")
    assert filtered.baseline == "muon baseline" and filtered.test.n_pairs == 3
    assert filtered.test.mean_diff == pytest.approx(-0.05)
    assert result.group("baseline").test is None  # AdamW's baseline is not labelled with Muon's settings

def test_a_muon_run_without_its_baseline_is_said_to_lack_the_unfiltered_muon_run(sweep, tmp_path):
    for seed in SEEDS:
        write_run(tmp_path / "muon" / f"muon-ema-a0.9-g0.1-s{seed}",
                  dict(optimizer="muon", grokfast=True, alpha=0.9, gain=0.1), CURVES["baseline"][seed], seed)
        write_run(tmp_path / "deep" / f"ema-a0.9-g0.1-d2-s{seed}", dict(grokfast=True, alpha=0.9, gain=0.1, depth=2),
                  CURVES["ema α0.9 g0.1"][seed], seed)
    notes = compare(runs_of(sweep, tmp_path / "muon", tmp_path / "deep")[0], "final", "all").notes
    [muon] = [n for n in notes if n.startswith("no baseline") and "muon ema" in n]
    assert muon.startswith("no baseline (the unfiltered Muon run with the same other settings) for muon ema")
    assert "AdamW" not in muon
    [adamw] = [n for n in notes if n.startswith("no baseline") and "depth=2" in n]
    assert adamw.startswith("no baseline (the unfiltered AdamW run with the same other settings) for ema")


def test_a_higher_is_better_column_ranks_and_sorts_the_other_way(tmp_path):
    accuracy = {"baseline": [[0.2, 0.5, 0.4], [0.3, 0.6, 0.5]],
                "ema α0.98 g2": [[0.5, 0.9, 0.95], [0.6, 0.8, 0.9]]}
    settings = {"baseline": {}, "ema α0.98 g2": dict(grokfast=True)}
    for label, curves in accuracy.items():
        for seed, values in enumerate(curves):
            run = tmp_path / "acc" / f"{label.split()[0]}-s{seed}"
            write_run(run, settings[label], [1.0, 1.0, 1.0], seed, epochs=[1.0, 2.0, 3.0])
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_acc": v}) + "\n"
                                                       for r, v in zip(rows, values)))
    runs, _ = runs_of(tmp_path / "acc")
    c = compare(runs, "best:2", "all", column=Column("val_acc", lower_is_better=False))
    assert [g.label for g in c.groups] == ["ema α0.98 g2", "baseline"]
    assert sorted(c.group("baseline").values) == pytest.approx([0.45, 0.55])  # the two highest of each run
    assert c.group("ema α0.98 g2").test.mean_diff == pytest.approx(np.mean([0.925 - 0.45, 0.85 - 0.55]))
    assert "higher is better" in format_table(c)


def test_a_null_val_loss_counts_as_infinite_not_as_missing(tmp_path):
    write_run(tmp_path / "s" / "baseline-s0", {}, [3.0, 2.5], 0, epochs=[1.0, 2.0])
    rows = (tmp_path / "s" / "baseline-s0" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    last["val_loss"] = None
    (tmp_path / "s" / "baseline-s0" / "metrics.jsonl").write_text(rows[0] + "\n" + json.dumps(last) + "\n")
    runs, _ = runs_of(tmp_path / "s")
    assert compare(runs, "final", "all").groups[0].values == [math.inf]
    assert compare(runs, "mean", "all").groups[0].values == [math.inf]
    assert compare(runs, "best", "all").groups[0].values == [3.0]


def test_window_bounds_include_the_evaluation_taken_on_the_step_that_crosses_them(tmp_path):
    # 250 steps per epoch: evaluations land one step past each whole epoch, as in training
    epochs = [1.004, 2.004, 3.004]
    write_run(tmp_path / "s" / "baseline-s0", {}, [3.0, 2.0, 1.0], 0, epochs=epochs, steps_per_epoch=249.0)
    runs, _ = runs_of(tmp_path / "s")
    assert compare(runs, "mean", "first:1").groups[0].values == [3.0]
    assert compare(runs, "mean", "first:2").groups[0].values == [2.5]
    assert compare(runs, "mean", "last:1").groups[0].values == [1.5]
    assert compare(runs, "mean", "last:0.5").groups[0].values == [1.0]


def test_best_n_with_fewer_evaluations_in_the_window_uses_all_of_them_with_a_note(sweep):
    runs, _ = runs_of(sweep)
    c = compare(runs, "best:5", "first:3")
    assert c.group("baseline").mean == pytest.approx(np.array(CURVES["baseline"])[:, :3].mean())
    assert any("fewer than 5" in n for n in c.notes)


def test_a_window_with_no_evaluations_leaves_the_run_out_with_a_note(sweep):
    runs, _ = runs_of(sweep)
    c = compare(runs, "final", "first:0.5")
    assert all(g.n == 0 and g.mean is None for g in c.groups)
    assert any("no evaluations in span first:0.5" in n for n in c.notes)
    assert "n/a" in format_table(c)


def test_the_same_run_given_twice_counts_once_and_missing_paths_get_a_note(sweep, tmp_path):
    runs, notes = runs_of(sweep, sweep / "baseline-s0", tmp_path / "nowhere")
    assert len(runs) == 12
    assert any("nowhere" in n for n in notes)


def test_a_seed_run_twice_in_a_configuration_pairs_by_its_mean_with_a_note(sweep, tmp_path):
    write_run(tmp_path / "again" / "ema-a0.9-g0.1-s0", SETTINGS["ema α0.9 g0.1"][0], [3.0] * 6, 0)
    runs, _ = runs_of(sweep, tmp_path / "again")
    c = compare(runs, "final", "all")
    g = c.group("ema α0.9 g0.1")
    assert g.n == 4 and g.mean == pytest.approx(np.mean([3.52, 3.57, 3.49, 3.0]))
    d = np.array([(3.52 + 3.0) / 2 - 3.55, 3.57 - 3.6, 3.49 - 3.5])
    assert g.test.n_pairs == 3 and g.test.mean_diff == pytest.approx(d.mean())
    assert any("ema α0.9 g0.1: a seed appears more than once" in n for n in c.notes)


# ----------------------------------------------------------------------------------------------- what separates runs

MINI_SHA = {"train": "173c87a5" + "0" * 56, "valid": "4cd0f687" + "0" * 56}
CUSTOM_SHA = {"train": "9e1f0a2b" + "1" * 56, "valid": "77aa0c3d" + "1" * 56}


def write_pair(root, label, seed_values, **kwargs):
    """A baseline and an EMA α0.9 g0.1 configuration over the seeds, the EMA runs `seed_values` below the baseline."""
    for seed, shift in seed_values.items():
        if label in ("both", "baseline"):
            write_run(root / f"baseline-s{seed}", {}, [4.0 + seed] * 6, seed, **kwargs)
        if label in ("both", "ema"):
            write_run(root / f"ema-a0.9-g0.1-s{seed}", dict(grokfast=True, alpha=0.9, gain=0.1),
                      [4.0 + seed - shift] * 6, seed, **kwargs)


def test_runs_on_other_data_are_other_configurations_paired_within_their_own_data(tmp_path):
    write_pair(tmp_path / "mini", "both", {0: 0.1, 1: 0.1, 2: 0.1}, recorded={"text_sha256": MINI_SHA})
    write_pair(tmp_path / "custom", "both", {0: 0.5, 1: 0.6, 2: 0.7},
               recorded={"text_sha256": CUSTOM_SHA, "data_dir": "/corpora/custom", "train_tokens": 20_000})
    c = compare(load_runs([tmp_path])[0], "final", "all")
    assert sorted(g.label for g in c.groups) == ["baseline data=173c87a5", "baseline data=9e1f0a2b",
                                                 "ema α0.9 g0.1 data=173c87a5", "ema α0.9 g0.1 data=9e1f0a2b"]
    assert all(g.n == 3 for g in c.groups)
    mini, custom = c.group("ema α0.9 g0.1 data=173c87a5"), c.group("ema α0.9 g0.1 data=9e1f0a2b")
    assert mini.baseline == "baseline data=173c87a5" and mini.test.mean_diff == pytest.approx(-0.1)
    assert custom.baseline == "baseline data=9e1f0a2b" and custom.test.mean_diff == pytest.approx(-0.6)
    assert any("baseline data=173c87a5 and baseline data=9e1f0a2b differ only in data "
               "(173c87a5 from mini vs 9e1f0a2b from /corpora/custom)" in n and "never pooled or paired" in n
               for n in c.notes)


def test_the_same_text_read_from_different_folders_is_the_same_data(tmp_path):
    write_pair(tmp_path / "a", "baseline", {0: 0, 1: 0}, recorded={"text_sha256": CUSTOM_SHA, "data_dir": "/a/wiki"})
    write_pair(tmp_path / "b", "ema", {0: 0.2, 1: 0.3}, recorded={"text_sha256": CUSTOM_SHA, "data_dir": "/b/wiki"})
    c = compare(load_runs([tmp_path])[0], "final", "all")
    assert [g.label for g in c.groups] == ["ema α0.9 g0.1", "baseline"]
    assert c.group("ema α0.9 g0.1").test.n_pairs == 2


def test_runs_recorded_before_the_data_hash_join_the_runs_of_the_same_dataset_that_have_it(tmp_path):
    write_pair(tmp_path / "old", "baseline", {0: 0, 1: 0})  # no text_sha256: dataset mini, no --data-dir
    write_pair(tmp_path / "new", "ema", {0: 0.2, 1: 0.3}, recorded={"text_sha256": MINI_SHA})
    write_pair(tmp_path / "old-dir", "both", {0: 0.1}, recorded={"data_dir": "/corpora/custom"})
    c = compare(load_runs([tmp_path])[0], "final", "all")
    ema = c.group("ema α0.9 g0.1 data=173c87a5")
    assert c.group("baseline data=173c87a5").n == 2 and ema.test.n_pairs == 2
    # an old run from a --data-dir no new run read is told apart by that folder
    assert c.group("ema α0.9 g0.1 data=/corpora/custom").baseline == "baseline data=/corpora/custom"


def test_a_filtered_gpu_run_is_not_paired_with_a_cpu_baseline_and_a_note_says_why(tmp_path):
    write_pair(tmp_path / "cpu", "baseline", {0: 0, 1: 0, 2: 0}, device="cpu")
    write_pair(tmp_path / "gpu", "ema", {0: 0.5, 1: 0.5, 2: 0.4}, device="cuda")
    c = compare(load_runs([tmp_path])[0], "final", "all")
    # --precision auto: bf16 on CUDA, fp32 on the CPU, so they differ in both
    gpu = c.group("ema α0.9 g0.1 device=cuda precision=bf16")
    assert gpu.baseline is None and gpu.test is None
    assert c.group("baseline device=cpu precision=fp32").is_baseline
    assert any(n.startswith("ema α0.9 g0.1 device=cuda precision=bf16: no baseline with its data, device and "
                            "precision (baseline device=cpu precision=fp32 differs only in device (cuda vs cpu) and "
                            "precision (bf16 vs fp32))") and n.endswith("not paired") for n in c.notes)
    # with a GPU baseline too, the GPU run pairs with it and the two baselines are listed apart
    write_pair(tmp_path / "gpu-base", "baseline", {0: 0, 1: 0, 2: 0}, device="cuda",
               recorded={"resolved_device": "cuda:1"})
    c = compare(load_runs([tmp_path])[0], "final", "all")
    gpu = c.group("ema α0.9 g0.1 device=cuda precision=bf16")
    assert gpu.baseline == "baseline device=cuda precision=bf16" and gpu.test.n_pairs == 3
    assert any("baseline device=cpu precision=fp32 and baseline device=cuda precision=bf16 differ only in device "
               "(cpu vs cuda) and precision (fp32 vs bf16)" in n for n in c.notes)


@pytest.mark.parametrize("recorded, label, why", [
    ({"resolved_precision": "bf16"}, "precision=bf16", "precision (bf16 vs fp32)"),
    ({"world_size": 8}, "world_size=8", "world_size (1 vs 8)"),
    ({"compile": False}, "compile=default", None),  # what the CPU does anyway
])
def test_precision_world_size_and_compile_separate_configurations_with_a_note(tmp_path, recorded, label, why):
    write_pair(tmp_path / "a", "both", {0: 0.1, 1: 0.2}, recorded={"resolved_precision": "fp32"})
    write_pair(tmp_path / "b", "both", {0: 0.3, 1: 0.4}, recorded={"resolved_precision": "fp32", **recorded})
    c = compare(load_runs([tmp_path])[0], "final", "all")
    if why is None:
        assert len(c.groups) == 2 and c.group("ema α0.9 g0.1").n == 4
        return
    assert len(c.groups) == 4
    other = c.group(f"ema α0.9 g0.1 {label}")
    assert other.baseline == f"baseline {label}" and other.test.mean_diff == pytest.approx(-0.35)
    assert any(f"differ only in {why}" in n for n in c.notes)


def test_runs_recorded_before_the_resolved_precision_resolve_auto_as_training_did(tmp_path):
    write_pair(tmp_path / "old", "baseline", {0: 0, 1: 0}, device="cuda")  # precision auto, not resolved
    write_pair(tmp_path / "new", "ema", {0: 0.2, 1: 0.3}, device="cuda", recorded={"resolved_precision": "bf16"})
    write_pair(tmp_path / "fp32", "ema", {0: 0.2}, device="cuda", recorded={"resolved_precision": "fp32"})
    c = compare(load_runs([tmp_path])[0], "final", "all")
    assert c.group("ema α0.9 g0.1 precision=bf16").test.n_pairs == 2
    assert c.group("ema α0.9 g0.1 precision=fp32").baseline is None


def test_compiling_against_the_device_s_default_separates_a_configuration(tmp_path):
    write_pair(tmp_path / "a", "both", {0: 0.1}, device="cuda")
    write_pair(tmp_path / "b", "both", {0: 0.3}, device="cuda", recorded={"compile": False})
    write_pair(tmp_path / "c", "both", {0: 0.2}, device="cuda", recorded={"compile": True})  # the default on CUDA
    c = compare(load_runs([tmp_path])[0], "final", "all")
    assert c.group("baseline compile=default").n == 2 and c.group("baseline compile=off").n == 1
    assert any("differ only in compile (default vs off)" in n for n in c.notes)


def test_every_setting_but_the_seed_and_the_bookkeeping_separates_configurations():
    ema = {**RunConfig(dataset="mini", tokenizer="bytes", preset="tiny", grokfast=True, alpha=0.9).to_dict(),
           "resolved_device": "cpu", "resolved_precision": "fp32", "world_size": 1, "n_params": 1000,
           "train_tokens": 10_000, "text_sha256": MINI_SHA, "versions": {"torch": "2.0"}}
    other = {"task": "modular", "dataset": "wikitext-2", "data_cache": "/x", "tokenizer": "gpt2", "preset": "hlb",
             "depth": 2, "width": 64, "gate": "relu", "seq_len": 64, "batch_size": 8, "grad_accum": 2,
             "seq_warmup": False, "optimizer": "grokadamw", "lr": 0.5, "weight_decay": 0.5, "warmup_steps": 7,
             "clip": 1.0, "grok_kappa": 0.5, "grok_gamma": 0.5, "muon_lr": 0.5, "muon_momentum": 0.5,
             "grokfast": False, "filter": "ma", "alpha": 0.5,
             "gain": 0.5, "window": 7, "filter_dtype": "bfloat16", "epochs": 2.0, "evals_per_epoch": 3,
             "eval_tokens": 7, "seed": 9, "max_steps": 7, "target_acc": 0.5, "target_loss": 3.5, "max_bad_steps": 3,
             "checkpoint_every": 0.5, "keep_checkpoints": 7, "device": "cuda", "precision": "bf16", "compile": True,
             "wandb": True, "wandb_project": "x", "data_dir": "/x", "resolved_device": "cuda",
             "resolved_precision": "bf16", "world_size": 2, "n_params": 7, "train_tokens": 7,
             "text_sha256": CUSTOM_SHA, "versions": {"torch": "9.9"}, "attention": "flex", "init_from": "/x",
             "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "in", "train_only": "norms",
             "eval_at_start": False, "eval_test": True, "train_tokens_limit": 4096, "profile": 3}
    assert set(RunConfig.__dataclass_fields__) <= set(other)  # a new setting must be added here
    # Neither what the run records but does not use (the window of an EMA run, GrokAdamW's settings), nor the
    # request that the recorded result stands for (--device auto, resolved; --data-dir and --dataset, read
    # through the text's sha256, which also decides train_tokens; --precision, resolved), nor the bookkeeping,
    # the seed and the versions, nor the attention kernel (the same function, to float rounding), nor Muon's
    # settings on an AdamW run.
    same = BOOKKEEPING_KEYS | {"seed", "versions", "window", "grok_kappa", "grok_gamma", "device", "data_dir",
                               "dataset", "precision", "train_tokens", "attention", "muon_lr", "muon_momentum"}
    for key, value in other.items():
        changed = group_key({**ema, key: value}) != group_key(ema)
        assert changed == (key not in same), key


def compare_main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def refused_in_one_line(code, out, err):
    assert "Traceback" not in err and code == 2 and out == "" and err.count("\n") == 1, err
    return err


def test_a_folder_whose_only_run_failed_before_any_evaluation_says_so_in_one_line(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "baseline-s0", {}, [], 0, status="failed")
    summary = tmp_path / "sweep" / "baseline-s0" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "error": "RuntimeError: out of memory"}))
    err = refused_in_one_line(*compare_main([tmp_path / "sweep"], capsys))
    assert "no run folders" not in err
    assert "nothing to compare: sweep/baseline-s0: no evaluations yet (failed: RuntimeError: out of memory)" in err


def test_a_folder_without_runs_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = refused_in_one_line(*compare_main([tmp_path / "empty"], capsys))
    assert f"nothing to compare: {tmp_path / 'empty'}: no run folders (with config.json) found" in err


def test_a_folder_of_sweeps_is_searched_for_runs(sweep):
    runs, _ = runs_of(sweep.parent)
    assert len(runs) == 12


@pytest.mark.parametrize("text", ["median", "best:0", "best:x", "best:-1", "final:3"])
def test_a_bad_metric_is_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--metric"):
        parse_metric(text)


@pytest.mark.parametrize("text", ["middle", "first:0", "last:-2", "first:", "last:inf", "first:x"])
def test_a_bad_window_is_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--span"):
        parse_span(text)


def test_metric_and_window_text_round_trips():
    assert parse_metric("best:4") == Metric("best", 4) and str(parse_metric("best:4")) == "best:4"
    assert parse_span("last:2.5") == Span("last", 2.5) and str(parse_span("first:10")) == "first:10"


def test_compare_module_imports_neither_torch_nor_click_nor_matplotlib():
    code = ("import sys, hlb_gpt.compare; "
            "print(sorted(m for m in ('torch', 'click', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------- plots


@pytest.fixture
def grid(tmp_path):
    """Thirteen configurations: the baseline and EMA alpha 0.8/0.9/0.99 x gain 0.1/0.5/2/5, two seeds each."""
    root = tmp_path / "grid"
    for seed in (0, 1):
        write_run(root / f"baseline-s{seed}", {}, [5.0, 4.0, 3.6, 3.5], seed, epochs=[0.25, 1.0, 2.0, 4.0])
        for alpha in (0.8, 0.9, 0.99):
            for gain in (0.1, 0.5, 2.0, 5.0):
                values = [5.0 + gain / 10, 4.0 + alpha, 3.6 + gain * alpha / 10 + seed / 100, 3.5 + gain / 20]
                write_run(root / f"ema-a{alpha}-g{gain}-s{seed}", dict(grokfast=True, alpha=alpha, gain=gain),
                          values, seed, epochs=[0.25, 1.0, 2.0, 4.0])
    runs, _ = load_runs([root])
    return compare(runs, "final", "all")


def test_plot_writes_valid_pngs_of_sensible_size(grid, tmp_path):
    paths = plot(grid, tmp_path / "plots", zoom=1.0)
    assert [p.name for p in paths] == ["val_loss_vs_epoch.png", "val_loss_vs_epoch_first1.png", "val_loss_vs_gain.png",
                                       "forest.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_plot_folder_under_a_file_is_refused_in_one_line_before_the_table(sweep, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    err = refused_in_one_line(*compare_main([sweep, "--plot", tmp_path / "a-file" / "plots"], capsys))
    assert f"--plot {tmp_path / 'a-file' / 'plots'}: {tmp_path / 'a-file'} is not a folder" in err


def test_an_unwritable_plot_folder_is_refused_in_one_line_before_the_table(sweep, tmp_path, capsys, monkeypatch):
    # Tests may run as root, whom no folder mode stops: the refusal the system would give is simulated.
    plots = tmp_path / "plots"
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == plots:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    err = refused_in_one_line(*compare_main([sweep, "--plot", plots], capsys))
    assert f"--plot {plots}: cannot write there (Permission denied)" in err


def test_an_unwritable_existing_plot_folder_is_refused_in_one_line(sweep, tmp_path, capsys, monkeypatch):
    plots = tmp_path / "plots"
    plots.mkdir()

    def refusing(real_open):
        def refuse(path, *args, **kwargs):
            if isinstance(path, (str, Path)) and Path(path).parent == plots:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)
        return refuse

    monkeypatch.setattr(os, "open", refusing(os.open))  # a file made by the os module
    monkeypatch.setattr(builtins, "open", refusing(builtins.open))  # and one made by open(), as matplotlib does
    err = refused_in_one_line(*compare_main([sweep, "--plot", plots], capsys))
    assert f"--plot {plots}: cannot write there (Permission denied)" in err


def test_curves_have_one_line_per_configuration_with_its_label(grid):
    ax = curves_figure(grid).axes[0]
    lines = ax.get_lines()
    assert len(grid.groups) == 13 and len(lines) == 13
    assert sorted(line.get_label().rsplit(" (n=", 1)[0] for line in lines) == sorted(g.label for g in grid.groups)
    baseline = next(line for line in lines if line.get_label().startswith("baseline"))
    # mean over seeds at each evaluation, against the mean epoch
    assert list(baseline.get_xdata()) == [0.25, 1.0, 2.0, 4.0] and list(baseline.get_ydata()) == [5.0, 4.0, 3.6, 3.5]


def test_thirteen_configurations_stay_distinguishable_and_the_baseline_stands_out(grid):
    lines = curves_figure(grid).axes[0].get_lines()
    looks = {(to_rgba(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(looks) == len(lines) == 13
    baseline = next(line for line in lines if line.get_label().startswith("baseline"))
    others = [line for line in lines if line is not baseline]
    assert to_rgba(baseline.get_color()) == (0.0, 0.0, 0.0, 1.0)
    assert all(to_rgba(line.get_color()) != (0.0, 0.0, 0.0, 1.0) for line in others)
    assert baseline.get_linewidth() > max(line.get_linewidth() for line in others)


def test_log_x_sets_a_logarithmic_epoch_axis(grid):
    assert curves_figure(grid, log_x=True).axes[0].get_xscale() == "log"
    assert curves_figure(grid).axes[0].get_xscale() == "linear"


def test_log_x_keeps_the_evaluation_at_epoch_0_on_a_linear_stretch_to_the_first_later_one(tmp_path):
    # A real run evaluates the untrained model at epoch 0. On a plain log axis that point sat at 1e-300 and the
    # first segment showed as a flat line at the epoch-1 value, hiding the fall from the untrained loss.
    for seed in (0, 1):
        write_run(tmp_path / "g" / f"baseline-s{seed}", {}, [5.5, 4.0, 3.0, 2.5], seed, epochs=[0.0, 1.0, 10.0, 100.0])
    ax = curves_figure(compare(load_runs([tmp_path / "g"])[0], "final", "all"), log_x=True).axes[0]
    assert ax.get_xscale() == "symlog" and ax.xaxis.get_transform().linthresh == 1.0
    assert "linear to 1, log scale after" in ax.get_xlabel()
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0.0, 1.0, 10.0, 100.0] and line.get_ydata()[0] == 5.5
    left, right = ax.get_xlim()
    assert left <= 0.0 < 100.0 <= right
    # Log after the linear stretch: 1, 10 and 100 equally spaced on the screen.
    at = [ax.transData.transform((x, 3.0))[0] for x in (1.0, 10.0, 100.0)]
    assert at[2] - at[1] == pytest.approx(at[1] - at[0])


def test_zoom_limits_the_epoch_axis_to_the_first_k_epochs(grid):
    low, high = curves_figure(grid, zoom=1.0).axes[0].get_xlim()
    assert low >= 0 and high == 1.0
    assert curves_figure(grid, log_x=True, zoom=2.0).axes[0].get_xlim()[1] == 2.0


def test_gain_chart_has_one_series_per_alpha_over_the_gains_and_the_baseline(grid):
    ax = gain_figure(grid).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["baseline (mean)", "ema α0.8", "ema α0.9", "ema α0.99"]
    series = next(c for c in ax.containers if c.get_label() == "ema α0.9")
    data_line = series.lines[0]
    assert list(data_line.get_xdata()) == [0.1, 0.5, 2.0, 5.0]
    expected = [grid.group(f"ema α0.9 g{g:g}").mean for g in (0.1, 0.5, 2.0, 5.0)]
    assert list(data_line.get_ydata()) == pytest.approx(expected)
    assert ax.get_xscale() == "log"


# ----------------------------------------------------------------------------------------------- grokking runs

# val_acc per seed at steps 10, 20, ..., 60 (an evaluation per epoch of 10 steps, as --task modular).
ACCURACY = {
    "baseline": [[0.1, 0.2, 0.3, 0.35, 0.4, 0.45], [0.1, 0.2, 0.3, 0.3, 0.4, 0.5], [0.1, 0.1, 0.2, 0.3, 0.3, 0.4]],
    "ema α0.98 g2": [[0.2, 0.5, 0.96, 0.97, 0.98, 0.99], [0.1, 0.3, 0.6, 0.9, 0.95, 0.99],
                     [0.2, 0.4, 0.9, 0.951, 0.96, 0.97]],  # 0.95 first reached at steps 30, 50, 40
    "ma w100 g5": [[0.1, 0.3, 0.9, 0.97, 0.9, 0.99], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
                   [0.1, 0.2, 0.3, 0.4, 0.5, 0.95]],  # steps 40, never, 60
}
GROKKING = {"baseline": {}, "ema α0.98 g2": dict(grokfast=True, alpha=0.98, gain=2.0),
            "ma w100 g5": dict(grokfast=True, filter="ma", window=100, gain=5.0)}


def write_accuracy_run(folder, settings, accuracy, seed, target_acc=0.95):
    """A modular-task run: an evaluation every 10 steps (one epoch) with the given val_acc."""
    epochs = [float(i + 1) for i in range(len(accuracy))]
    write_run(folder, {"task": "modular", "target_acc": target_acc, **settings}, [1.0] * len(accuracy), seed,
              epochs=epochs, steps_per_epoch=10)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_acc": a, "train_acc": 1.0}) + "\n"
                                                  for r, a in zip(rows, accuracy)))


@pytest.fixture
def grokking(tmp_path):
    root = tmp_path / "grokking"
    for label, curves in ACCURACY.items():
        for seed, accuracy in enumerate(curves):
            write_accuracy_run(root / f"{label.split()[0]}-s{seed}", GROKKING[label], accuracy, seed)
    return root


def test_steps_to_target_is_the_first_evaluation_at_or_above_the_runs_target(grokking):
    c = compare(load_runs([grokking])[0], "steps_to_target", "all")
    ema = c.group("ema α0.98 g2")
    assert ema.values == [30.0, 50.0, 40.0] and ema.mean == 40.0 and ema.std == pytest.approx(10.0)
    assert c.group("ma w100 g5").values == [40.0, math.inf, 60.0]
    assert c.groups[0].label == "ema α0.98 g2"  # fewer steps is better
    assert c.column.name == "val_acc"  # what its curves show


def test_a_run_that_never_reaches_the_target_counts_as_infinite_and_says_so(grokking):
    c = compare(load_runs([grokking])[0], "steps_to_target", "all")
    assert c.group("baseline").values == [math.inf] * 3 and c.group("baseline").std is None
    assert "baseline: 3 of 3 run(s) never reached the target (the longest ran 60 steps), so its mean is +inf " \
           "and its std n/a" in c.notes
    assert "ma w100 g5: 1 of 3 run(s) never reached the target (the longest ran 60 steps), so its mean is +inf " \
           "and its std n/a" in c.notes
    test = c.group("ema α0.98 g2").test
    assert test.n_pairs == 3 and test.mean_diff is None and "target never reached" in test.reason


def test_steps_to_target_is_paired_against_a_baseline_that_reaches_it(tmp_path):
    reach = {"baseline": [60, 50, 60], "ema α0.98 g2": [30, 50, 40]}
    for label, steps in reach.items():
        for seed, step in enumerate(steps):
            accuracy = [0.5 if 10 * (i + 1) < step else 0.96 for i in range(6)]
            write_accuracy_run(tmp_path / "g" / f"{label.split()[0]}-s{seed}", GROKKING[label], accuracy, seed)
    c = compare(load_runs([tmp_path / "g"])[0], "steps_to_target", "all")
    t = c.group("ema α0.98 g2").test
    expected = stats.ttest_rel([30, 50, 40], [60, 50, 60])
    assert t.mean_diff == pytest.approx(-50 / 3) and t.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    table = format_table(c)
    assert "steps to val_acc >= the run's --target-acc" in table and "lower is better" in table
    assert "| ema α0.98 g2 | 3 | 40.0 ± 10.0 | -16.7 |" in table


def test_steps_to_target_rejects_a_window_and_leaves_out_runs_without_a_target(grokking, tmp_path):
    runs, _ = load_runs([grokking])
    with pytest.raises(ValueError, match="drop --span"):
        compare(runs, "steps_to_target", "last:2")
    write_accuracy_run(tmp_path / "untargeted" / "baseline-s5", {}, [0.99], 5, target_acc=None)
    c = compare(load_runs([tmp_path / "untargeted"])[0], "steps_to_target", "all")
    assert "no --target-acc recorded for 1 run(s), left out: untargeted/baseline-s5" in c.notes
    assert c.group("baseline").n == 0 and c.group("baseline").mean is None


def test_accuracy_columns_are_higher_is_better_by_name(grokking):
    assert not COLUMNS["val_acc"].lower_is_better and not COLUMNS["train_acc"].lower_is_better
    c = compare(load_runs([grokking])[0], "best", "all", "val_acc")
    assert c.group("ema α0.98 g2").values == [0.99, 0.99, 0.97] and c.groups[0].label == "ema α0.98 g2"


def test_compare_command_tabulates_steps_to_target_and_plots_accuracy(grokking, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(grokking), "--metric", "steps_to_target", "--plot", str(tmp_path / "plots")])
    out, err = capsys.readouterr()
    assert exc.value.code == 0
    assert "| ema α0.98 g2 | 3 | 40.0 ± 10.0 |" in out and "never reached the target" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["steps_to_target_vs_gain.png",
                                                                     "val_acc_vs_epoch.png"]
    assert "wrote" in err


def test_compare_command_offers_exactly_the_known_columns(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    choices = ["val_loss", "train_loss", "val_acc", "train_acc", "val_ppl", "val_bpb", "test_loss", "test_ppl",
               "test_bpb"]
    assert f"[{'|'.join(choices)}]" in " ".join(out.split()).replace("| ", "|") and list(COLUMNS) == choices


def test_compare_command_refuses_a_bad_choice_in_one_line(grokking, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(grokking), "--metric", "steps_to_target", "--span", "first:3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines() == [
        "Error: --metric steps_to_target reads the whole run: drop --span first:3"]


def test_val_acc_of_language_model_runs_is_a_usage_error_not_a_divergence(sweep, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(sweep), "--column", "val_acc"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""
    assert err.strip().splitlines() == ["Error: --column val_acc: none of these runs records it (language-model "
                                        "runs record val_loss and train_loss, val_ppl with GPT-2 tokens and val_bpb; "
                                        "test_loss, test_ppl and test_bpb with --eval-test; val_acc and train_acc "
                                        "are --task modular's)"]


def test_runs_without_the_column_are_left_out_with_a_note_beside_runs_that_have_it(sweep, grokking):
    c = compare(load_runs([sweep, grokking])[0], "best", "all", "val_acc")
    lacking = [n for n in c.notes if n.startswith("no val_acc column in the metrics of 12 run(s), left out")]
    assert len(lacking) == 1 and "sweep/baseline-s0" in lacking[0]
    assert not any("diverged" in n for n in c.notes)
    # The grokking runs are --task modular's (the only task with --target-acc), the sweep's language models'.
    assert c.group("ema α0.98 g2 target_acc=0.95 task=modular").values == [0.99, 0.99, 0.97]
    assert c.group("baseline target_acc=None task=lm").n == 0  # not counted as -inf


def test_the_old_window_flag_of_compare_still_sets_the_span_with_a_one_line_note(sweep, capsys):
    outputs = []
    for flag in ("--span", "--window"):
        with pytest.raises(SystemExit) as exc:
            main(["compare", str(sweep), flag, "first:3"])
        assert exc.value.code == 0
        outputs.append(capsys.readouterr())
    assert outputs[1].out == outputs[0].out and "(first:3)" in outputs[0].out
    assert outputs[1].err.splitlines() == ["note: compare's --window is now --span (--window is the MA filter's, "
                                           "in steps)"]
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(sweep), "--span", "all", "--window", "first:3"])
    assert exc.value.code == 2 and "give --span only" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the evaluation before training


def with_step_0(folder, val_loss, **columns):
    """Prepend the evaluation before training (step 0, no training columns) to a hand-made run's metrics."""
    row = {"epoch": 0.0, "step": 0, "tokens": 0, "train_loss": None, "val_loss": val_loss, "lr": 0.0,
           "grad_norm": None, "ema_ratio": None, "time_s": 0.0, "tokens_per_s": None, **columns}
    path = folder / "metrics.jsonl"
    path.write_text(json.dumps(row) + "\n" + path.read_text())


def test_a_run_with_only_the_evaluation_before_training_is_left_out_with_a_note(sweep):
    for seed in SEEDS:  # every run of the sweep evaluated the untrained model too
        for label in CURVES:
            with_step_0(sweep / f"{FOLDER[label]}-s{seed}", 5.70)
    # killed right after its step-0 row, as a sweep just started looks
    write_run(sweep / "ema-a0.9-g0.1-s3", SETTINGS["ema α0.9 g0.1"][0], [], 3, status=None)
    with_step_0(sweep / "ema-a0.9-g0.1-s3", 5.70)
    runs, notes = runs_of(sweep)
    assert len(runs) == 12
    assert any("ema-a0.9-g0.1-s3" in n and "no evaluation after training began" in n for n in notes)
    c = compare(runs, "final", "all", notes=notes)
    assert c.group("ema α0.9 g0.1").n == 3 and c.group("ema α0.9 g0.1").test.n_pairs == 3


def test_statistics_read_only_evaluations_after_training_began(sweep):
    for seed in SEEDS:
        for label in CURVES:
            with_step_0(sweep / f"{FOLDER[label]}-s{seed}", 1.0)  # better than any trained value, and untrained
    runs, _ = runs_of(sweep)
    for metric in METRICS:
        c = compare(runs, metric, "first:3")
        for label in CURVES:
            assert c.group(label).values == pytest.approx(list(expected_per_run(label, metric, "first:3")))


def test_a_run_diverged_before_its_first_trained_evaluation_has_no_best_but_the_worst(sweep, tmp_path):
    write_run(tmp_path / "div" / "ema-a0.99-g50-s0", dict(grokfast=True, alpha=0.99, gain=50.0), [], 0,
              epochs=[], status="diverged")
    with_step_0(tmp_path / "div" / "ema-a0.99-g50-s0", 5.6739)
    runs, _ = runs_of(sweep, tmp_path / "div")
    for resample in (None, 20):
        assert compare(runs, "best", "all", resample=resample).group("ema α0.99 g50").values == [math.inf]


def test_a_target_met_by_the_untrained_model_counts_from_the_first_trained_evaluation_that_meets_it(tmp_path):
    folder = tmp_path / "g" / "baseline-s0"
    write_accuracy_run(folder, {}, [0.005, 0.02, 0.03], 0, target_acc=0.01)
    with_step_0(folder, 4.6, val_acc=0.011, train_acc=None)
    assert compare(load_runs([tmp_path / "g"])[0], "steps_to_target", "all").group("baseline").values == [20.0]


# ----------------------------------------------------------------------------------------------- steps_to:X, time_to:X

# By hand from CURVES: the evaluation (epoch; 100 steps and, as written, 1 training second an epoch) at which each
# seed's val_loss first reaches 3.6; the ema α0.99 g5 and ma w100 g5 runs never do.
REACH_3_6 = {"baseline": [5, 6, 5], "ema α0.9 g0.1": [5, 6, 5]}


def test_steps_to_and_time_to_a_loss_are_read_at_the_first_evaluation_at_or_below_it(sweep):
    runs, _ = load_runs([sweep])
    steps, seconds = compare(runs, "steps_to:3.6", "all"), compare(runs, "time_to:3.6", "all")
    for label, epochs in REACH_3_6.items():
        assert steps.group(label).values == [100.0 * e for e in epochs]
        assert seconds.group(label).values == [float(e) for e in epochs]
    assert steps.column.name == seconds.column.name == "val_loss"  # what their curves show
    assert steps.metric == Metric("steps_to", target=3.6) and str(seconds.metric) == "time_to:3.6"
    assert steps.groups[0].label == "baseline" and math.isinf(steps.groups[-1].mean)  # sooner is better


@pytest.mark.parametrize("metric", ["steps_to:3.6", "time_to:3.6"])
def test_a_run_that_never_reaches_the_loss_counts_as_infinite_as_steps_to_target_counts_it(sweep, metric):
    c = compare(load_runs([sweep])[0], metric, "all")
    for label in ("ema α0.99 g5", "ma w100 g5"):
        g = c.group(label)
        assert g.values == [math.inf] * 3 and g.mean == math.inf and g.std is None
        assert f"{label}: 3 of 3 run(s) never reached the target (the longest ran 600 steps), so its mean is +inf " \
               "and its std n/a" in c.notes
        assert g.test.mean_diff is None and "target never reached" in g.test.reason


def test_a_run_that_diverged_before_reaching_the_loss_counts_as_never_reaching_it(tmp_path):
    write_run(tmp_path / "g" / "baseline-s0", {}, [5.0, 4.0, math.nan], 0, epochs=[1.0, 2.0, 3.0], status="diverged")
    write_run(tmp_path / "g" / "baseline-s1", {}, [5.0, 3.0, math.nan], 1, epochs=[1.0, 2.0, 3.0], status="diverged")
    c = compare(load_runs([tmp_path / "g"])[0], "steps_to:3.5", "all")
    assert c.group("baseline").values == [math.inf, 200.0]


@pytest.mark.parametrize("text", ["steps_to:abc", "steps_to:-1", "steps_to:0", "time_to:nan", "time_to:inf",
                                  "steps_to:", "time_to"])
def test_a_loss_target_of_compare_must_be_a_positive_number(text):
    with pytest.raises(ValueError, match="--metric"):
        parse_metric(text)


@pytest.mark.parametrize("args", [["--metric", "steps_to:abc"], ["--metric", "steps_to:-1"],
                                  ["--metric", "time_to:3.6", "--span", "last:2"],
                                  ["--metric", "steps_to:3.6", "--resample", "10"]])
def test_compare_command_refuses_a_bad_loss_target_in_one_line(sweep, capsys, args):
    err = refused_in_one_line(*compare_main([sweep, *args], capsys))
    assert "--metric" in err or "--span" in err


def test_compare_command_tabulates_and_plots_the_time_to_a_loss(sweep, tmp_path, capsys):
    code, out, err = compare_main([sweep, "--metric", "time_to:3.6", "--plot", tmp_path / "plots"], capsys)
    assert code == 0
    assert "training seconds to val_loss <= 3.6" in out and "lower is better" in out
    assert "| baseline | 3 | 5.33 ± 0.58 |" in out and "never reached the target" in out
    assert "time_to_3.6_vs_gain.png" in {p.name for p in (tmp_path / "plots").iterdir()}


@pytest.mark.slow
def test_steps_to_and_time_to_agree_with_the_summary_of_a_run_stopped_at_that_target_loss(tmp_path):
    from hlb_gpt.records import read_run
    from tiny_runs import train_tiny

    fast = dict(lr=1e-2, evals_per_epoch=2000, max_steps=30)
    reached = train_tiny(tmp_path / "g" / "baseline-s0", tmp_path / "cache", target_loss=4.5, **fast)
    missed = train_tiny(tmp_path / "missed" / "baseline-s0", tmp_path / "cache", target_loss=1.0, **fast)
    summary, never = read_run(reached).summary, read_run(missed).summary
    assert summary["steps_to_target"] is not None and summary["steps_to_target"] < 30  # it stopped there
    runs = load_runs([tmp_path / "g"])[0]
    assert compare(runs, "steps_to:4.5", "all").group("baseline").values == [summary["steps_to_target"]]
    assert compare(runs, "time_to:4.5", "all").group("baseline").values == [summary["time_to_target_s"]]
    assert never["steps_to_target"] is None and never["steps"] == 30
    assert compare(load_runs([tmp_path / "missed"])[0], "time_to:1", "all").group("baseline").values == [math.inf]
