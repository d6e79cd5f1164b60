import json
import math

import numpy as np
import pytest

from hlb_gpt.compare import COLUMNS, compare, load_runs
from hlb_gpt.data import _gpt2_encoding, get_tokenizer, load_split_texts, load_tokens
from hlb_gpt.units import bits_per_byte, loss_units, perplexity
from test_compare import write_run
from tiny_runs import TINY_LM, run_main, train_tiny

LN2 = math.log(2)


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the units ------------------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_loss_and_infinite_past_what_a_float_holds():
    assert perplexity(3.5) == math.exp(3.5)
    assert perplexity(1e6) == math.inf and math.isnan(perplexity(math.nan))


def test_bits_per_byte_are_the_summed_nats_in_bits_over_the_bytes_and_exactly_loss_over_ln2_for_one_byte_a_token():
    assert bits_per_byte(2.0, 300, 1200) == pytest.approx(2.0 * 300 / (1200 * LN2), rel=1e-15)
    assert bits_per_byte(1.2345, 777, 777) == 1.2345 / LN2
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 10, 0)


def test_perplexity_is_reported_for_gpt2_tokens_and_bits_per_byte_for_both_tokenizers():
    assert set(loss_units("val", 3.0, "gpt2", 10, 40)) == {"val_ppl", "val_bpb"}
    assert set(loss_units("test", 3.0, "bytes", 10, 10)) == {"test_bpb"}


# --- byte counts on mini --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_the_bytes_of_a_split_s_tokens_are_the_utf8_bytes_of_its_text(name, tmp_path):
    tokenizer = get_tokenizer(name)
    text = load_split_texts("mini")["valid"]
    ids = load_tokens("mini", tokenizer, tmp_path)["valid"]
    assert tokenizer.n_bytes(ids) == len(text.encode("utf-8")) == 1_146_846
    assert tokenizer.n_bytes(ids[1:9]) == len(b"".join(_bytes_of(name, ids[1:9])))


def _bytes_of(name, ids):
    if name == "bytes":
        return [bytes([int(i)]) for i in ids]
    return [_gpt2_encoding().decode_single_token_bytes(int(i)) for i in ids]


# --- the records ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_gpt2_run_records_val_ppl_as_exp_of_val_loss_and_val_bpb_from_the_bytes_of_the_evaluated_prefix(tmp_path):
    run = train_tiny(tmp_path / "run", tmp_path / "cache", tokenizer="gpt2", max_steps=2)
    # --eval-tokens 1024 at --seq-len 32: 31 windows, whose targets are tokens 1..992 of the validation split.
    targets = load_tokens("mini", get_tokenizer("gpt2"), tmp_path / "cache")["valid"][1:993]
    n_bytes = len(_gpt2_encoding().decode_bytes(targets.tolist()))
    rows = rows_of(run)
    assert len(rows) == 2
    for row in rows:
        assert row["val_ppl"] == math.exp(row["val_loss"])
        assert row["val_bpb"] == pytest.approx(row["val_loss"] * 992 / (n_bytes * LN2), rel=1e-12)
        assert not {"train_ppl", "train_bpb"} & set(row)  # rows stay small: training losses stay in nats


def test_a_bytes_run_records_bits_per_byte_as_loss_over_ln2_and_no_perplexity(tmp_path):
    run = train_tiny(tmp_path / "run", tmp_path / "cache", max_steps=2)
    for row in rows_of(run):
        assert row["val_bpb"] == row["val_loss"] / LN2 and "val_ppl" not in row


# --- compare --------------------------------------------------------------------------------------------------


def write_unit_runs(root, tokenizer, units=True, test=None):
    """A baseline and an EMA run over seeds 0 and 1 with the units in their rows (or, `units=False`, recorded
    before the units existed), and `test` {label: [test_loss per seed]} in their summaries."""
    losses = {"baseline": [[4.0, 3.0], [4.2, 3.2]], "ema": [[3.8, 2.8], [4.1, 2.9]]}
    settings = {"baseline": {}, "ema": dict(grokfast=True)}
    for label, curves in losses.items():
        for seed, values in enumerate(curves):
            run = root / f"{label}-s{seed}"
            write_run(run, settings[label], values, seed, epochs=[1.0, 2.0], recorded={"tokenizer": tokenizer})
            if units:
                rows = rows_of(run)
                extra = [loss_units("val", r["val_loss"], tokenizer, 100, 400) for r in rows]
                (run / "metrics.jsonl").write_text("".join(json.dumps({**r, **e}) + "\n"
                                                           for r, e in zip(rows, extra)))
            if test is not None:
                summary = json.loads((run / "summary.json").read_text())
                loss = test[label][seed]
                summary.update(test_loss=loss, **loss_units("test", loss, tokenizer, 100, 400))
                (run / "summary.json").write_text(json.dumps(summary))


def test_compare_offers_perplexity_and_bits_per_byte_as_columns_read_from_the_rows(tmp_path, capsys):
    write_unit_runs(tmp_path / "grid", "gpt2")
    c = compare(load_runs([tmp_path / "grid"])[0], "final", "all", "val_ppl")
    assert c.group("baseline").values == [math.exp(3.0), math.exp(3.2)]
    c = compare(load_runs([tmp_path / "grid"])[0], "best", "all", "val_bpb")
    assert c.group("ema α0.98 g2").values == pytest.approx([2.8 / 4 / LN2, 2.9 / 4 / LN2], rel=1e-12)
    code, out, err = run_main(["compare", str(tmp_path / "grid"), "--column", "val_bpb", "--metric", "final"], capsys)
    assert code == 0 and "final val_bpb" in out


def test_runs_recorded_before_the_units_get_them_from_the_loss_where_the_tokenizer_allows(tmp_path):
    write_unit_runs(tmp_path / "gpt2", "gpt2", units=False)
    write_unit_runs(tmp_path / "bytes", "bytes", units=False)
    c = compare(load_runs([tmp_path / "gpt2"])[0], "final", "all", "val_ppl")
    assert c.group("baseline").values == [math.exp(3.0), math.exp(3.2)]
    c = compare(load_runs([tmp_path / "bytes"])[0], "final", "all", "val_bpb")
    assert c.group("baseline").values == [3.0 / LN2, 3.2 / LN2]
    # GPT-2 bits per byte need the byte count of the text evaluated, which old rows do not hold.
    c = compare(load_runs([tmp_path / "gpt2"])[0], "final", "all", "val_bpb")
    assert all(g.n == 0 for g in c.groups)
    assert any(n.startswith("no val_bpb column in the metrics of 4 run(s), left out") for n in c.notes)
    # and byte runs have no perplexity to compare
    c = compare(load_runs([tmp_path / "bytes"])[0], "final", "all", "val_ppl")
    assert all(g.n == 0 for g in c.groups)


def test_compare_says_in_one_line_when_no_run_has_the_unit_asked_for(tmp_path, capsys):
    write_unit_runs(tmp_path / "gpt2", "gpt2", units=False)
    code, out, err = run_main(["compare", str(tmp_path / "gpt2"), "--column", "val_bpb"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("Error: --column val_bpb: none of these runs records it")


def test_the_test_split_columns_compare_the_summary_s_value_at_the_end_of_each_run(tmp_path, capsys):
    test = {"baseline": [3.1, 3.3], "ema": [2.9, 3.0]}
    write_unit_runs(tmp_path / "grid", "gpt2", test=test)
    runs = load_runs([tmp_path / "grid"])[0]
    c = compare(runs, "final", "all", "test_loss")
    assert c.group("baseline").values == [3.1, 3.3] and c.group("ema α0.98 g2").values == [2.9, 3.0]
    assert c.group("ema α0.98 g2").test.mean_diff == pytest.approx(-0.25)
    assert compare(runs, "final", "all", "test_ppl").group("baseline").values == [math.exp(3.1), math.exp(3.3)]
    assert compare(runs, "final", "all", "test_bpb").group("baseline").values == pytest.approx(
        [3.1 / 4 / LN2, 3.3 / 4 / LN2], rel=1e-12)
    code, out, err = run_main(["compare", str(tmp_path / "grid"), "--column", "test_loss", "--plot",
                               str(tmp_path / "plots")], capsys)
    assert code == 0 and "final test_loss" in out and (tmp_path / "plots" / "test_loss_vs_epoch.png").is_file()


def test_runs_without_a_test_evaluation_are_left_out_of_a_test_column_with_a_note(tmp_path, capsys):
    write_unit_runs(tmp_path / "grid", "gpt2", test={"baseline": [3.1, 3.3], "ema": [2.9, 3.0]})
    write_unit_runs(tmp_path / "old", "gpt2")
    c = compare(load_runs([tmp_path / "grid", tmp_path / "old"])[0], "final", "all", "test_loss")
    assert any(n.startswith("no test_loss in the summaries of 4 run(s), left out") for n in c.notes)
    code, out, err = run_main(["compare", str(tmp_path / "old"), "--column", "test_loss"], capsys)
    assert code == 2 and err.startswith("Error: --column test_loss: none of these runs records it")
    code, out, err = run_main(["compare", str(tmp_path / "grid"), "--column", "test_loss", "--resample", "5"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--resample" in err


def test_every_unit_column_is_a_compare_choice():
    assert {"val_ppl", "val_bpb", "test_loss", "test_ppl", "test_bpb"} <= set(COLUMNS)
    assert all(COLUMNS[name].lower_is_better for name in ("val_ppl", "val_bpb", "test_loss", "test_ppl", "test_bpb"))


def test_a_diverged_run_counts_as_the_worst_test_loss_not_as_missing(tmp_path):
    write_unit_runs(tmp_path / "grid", "gpt2", test={"baseline": [3.1, 3.3], "ema": [2.9, 3.0]})
    summary = json.loads((tmp_path / "grid" / "ema-s1" / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if not k.startswith("test_")}
    (tmp_path / "grid" / "ema-s1" / "summary.json").write_text(json.dumps({**summary, "status": "diverged"}))
    c = compare(load_runs([tmp_path / "grid"])[0], "final", "all", "test_loss")
    assert c.group("ema α0.98 g2").values == [2.9, math.inf]
