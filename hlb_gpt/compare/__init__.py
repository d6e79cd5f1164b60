"""`hlb-gpt compare`: group runs by configuration, compare each with its unfiltered baseline, tabulate.

Needs numpy and scipy; the figures are in `hlb_gpt.plots`. The rules are in docs/DESIGN.md, section 11. Read the
modules in this order, each depending only on those before it:

- `loading`: which folders are runs, which runs count, and a note on each one left out;
- `configurations`: which runs are one configuration, its baseline, its label;
- `statistics`: the per-run statistic (`Metric` over a `Span` of epochs, on a `Column`), the paired test and
  the Holm and Benjamini–Hochberg adjustments;
- `comparison`: `compare()`, which puts them together, with costs, order and notes;
- `report`: the table, as markdown or CSV.
"""

from hlb_gpt.compare.comparison import Comparison, Group, compare
from hlb_gpt.compare.configurations import group_key, normalise_config, short_label
from hlb_gpt.compare.loading import load_runs, run_label, run_rows
from hlb_gpt.compare.report import format_notes, format_table
from hlb_gpt.compare.statistics import (COLUMN_OWNERS, COLUMNS, Column, Metric, PairedTest, Span, lacks_column,
                                        parse_choices, parse_column, parse_metric, parse_span, steps_to_target,
                                        to_loss)

__all__ = [
    "COLUMNS", "COLUMN_OWNERS", "Column", "Comparison", "Group", "Metric", "PairedTest", "Span", "compare",
    "format_notes", "format_table", "group_key", "lacks_column", "load_runs", "normalise_config", "parse_choices",
    "parse_column", "parse_metric", "parse_span", "run_label", "run_rows", "short_label", "steps_to_target",
    "to_loss",
]
