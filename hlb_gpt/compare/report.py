"""A comparison as text: markdown (title, table, notes) or CSV (the table only; `format_notes` gives the notes,
for stderr)."""

from __future__ import annotations

import csv
import io
import math

from hlb_gpt.compare.comparison import Comparison, Group, families
from hlb_gpt.compare.statistics import ALPHA, CONFIDENCE, PairedTest

NA = "n/a"
SELF = "—"
CSV_FIELDS = ("configuration", "n", "mean", "std", "diff", "ci_low", "ci_high", "p_value", "p_holm", "q_bh", "pairs",
              "filter_mb", "filter_pct_of_peak", "step_time_overhead_pct", "baseline", "metric", "span", "column")


def format_table(comparison: Comparison, fmt: str = "markdown") -> str:
    """Markdown (title, table, notes) or CSV (one row per configuration; notes via `format_notes`)."""
    if fmt == "csv":
        return _csv(comparison)
    if fmt != "markdown":
        raise ValueError(f"--format must be markdown or csv (got {fmt!r})")
    c = comparison
    title = (f"{c.metric.describe(c.column)}, {c.span.describe()} "
             f"({'lower' if c.metric.lower_is_better(c.column) else 'higher'} is better); mean ± std over seeds, "
             f"difference = configuration − baseline, paired over shared seeds")
    header = ["configuration", "n", f"{c.metric} ({c.span})", "Δ vs baseline", f"{CONFIDENCE:.0%} CI", "p",
              "p Holm", "q BH", "pairs", "filter MB", "% of peak", "step time"]
    spec = c.metric.spec
    rows = [[g.label, str(g.n), _mean_std(g, spec), *_diff_cells(g, spec), _num(g.filter_mb, ".1f"),
             _pct(g.filter_pct_of_peak, ".2f"), SELF if g.is_baseline else _pct(g.step_time_overhead_pct, "+.1f")]
            for g in c.groups]
    lines = [title, "", _md_row(header), _md_row(["---"] * len(header))] + [_md_row(r) for r in rows]
    notes = format_notes(c)
    return "\n".join(lines + (["", notes] if notes else [])) + "\n"


def format_notes(comparison: Comparison) -> str:
    """What goes under the table: the family note (when a p-value was adjusted), then the notes."""
    notes = "\n".join(["Notes:"] + [f"- {n}" for n in comparison.notes]) if comparison.notes else ""
    return "\n\n".join(filter(None, [family_note(comparison), notes]))


def family_note(comparison: Comparison) -> str | None:
    """Which p-value is adjusted, how, and over which tests; None when no configuration has a p-value."""
    found = families(comparison.groups)
    if not found:
        return None
    c = comparison
    sizes = ", ".join(f"{base} ({len(tests)} test{'s' if len(tests) != 1 else ''})"
                      for base, tests in sorted(found.items()))
    return (f"Multiple comparisons: p is the two-sided paired t-test's p-value; p Holm (Holm, family-wise error) "
            f"and q BH (Benjamini–Hochberg, false discovery rate) adjust it within its family, the configurations "
            f"paired with one baseline that have a p-value, in one metric, span and column ({c.metric}, {c.span}, "
            f"{c.column.name}): {sizes}. The {CONFIDENCE:.0%} CI is not adjusted; the forest plot colours a "
            f"difference only where p Holm < {ALPHA:g}.")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _num(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return NA
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = format(value, spec)
    return format(0.0, spec) if float(text) == 0 else text  # no "-0.0" from rounding noise


def _pct(value: float | None, spec: str) -> str:
    text = _num(value, spec)
    return text if text == NA else text + "%"


def _mean_std(g: Group, spec: str) -> str:
    if g.mean is None:
        return NA
    return f"{_num(g.mean, spec)} ± {_num(g.std, spec)}"


def _diff_cells(g: Group, spec: str) -> list[str]:
    if g.is_baseline:
        return [SELF] * 6
    t = g.test
    if t is None:
        return [NA] * 6
    ci = NA if t.ci_low is None else f"[{t.ci_low:+{spec}}, {t.ci_high:+{spec}}]"
    p_values = [NA if p is None else f"{p:.3g}" for p in (t.p_value, t.p_holm, t.q_bh)]
    return [_num(t.mean_diff, "+" + spec), ci, *p_values, str(t.n_pairs)]


def _csv(c: Comparison) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    cell = lambda v: "" if v is None else (repr(v) if isinstance(v, float) else str(v))  # noqa: E731
    for g in c.groups:
        t = g.test or PairedTest(0, ())
        writer.writerow([cell(v) for v in (
            g.label, g.n, g.mean, g.std, t.mean_diff, t.ci_low, t.ci_high, t.p_value, t.p_holm, t.q_bh,
            None if g.test is None else t.n_pairs, g.filter_mb, g.filter_pct_of_peak, g.step_time_overhead_pct,
            g.baseline, str(c.metric), str(c.span), c.column.name)])
    return out.getvalue()
