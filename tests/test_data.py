import hashlib
import io
import json
import logging
import lzma
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from hlb_gpt import data

TEST_RAW_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
VALID_RAW_SHA256 = "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The bundled mini corpus is WikiText-2 raw: its train split is wiki.test.raw, its valid split wiki.valid.raw.
MINI_SHA256 = {"train": TEST_RAW_SHA256, "valid": VALID_RAW_SHA256}


@pytest.fixture(scope="module")
def gpt2() -> data.Tokenizer:
    return data.get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def mini_texts() -> dict[str, str]:
    return data.load_split_texts("mini")


@pytest.fixture(scope="module")
def mini_gpt2_tokens(tmp_path_factory, gpt2) -> dict[str, torch.Tensor]:
    return data.load_tokens("mini", gpt2, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def single_call_encodings(gpt2, mini_texts) -> dict[str, tuple[str, list[int]]]:
    """The bundled WikiText-2 splits and their tokens from one plain encode_ordinary call each."""
    encoding = data._gpt2_encoding()
    return {split: (text, encoding.encode_ordinary(text)) for split, text in mini_texts.items()}


@pytest.fixture
def small_data_dir(tmp_path, mini_texts) -> Path:
    """A --data-dir holding the first ~40 lines of each mini split."""
    folder = tmp_path / "raw"
    folder.mkdir()
    for split, name in (("train", "wiki.train.raw"), ("valid", "wiki.valid.raw")):
        lines = mini_texts[split].split("\n")[:40]
        (folder / name).write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return folder


# --- tokenizers -----------------------------------------------------------------------------------------------


def test_gpt2_tokenizer_is_built_from_the_bundled_ranks_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    data._gpt2_encoding.cache_clear()
    try:
        tokenizer = data.get_tokenizer("gpt2")
        assert tokenizer.encode("Hello world").tolist() == [15496, 995]
        assert tokenizer.n_vocab == 50257
    finally:
        data._gpt2_encoding.cache_clear()


def test_gpt2_tokenizer_ignores_a_damaged_copy_in_the_tiktoken_cache(tmp_path, monkeypatch):
    # tiktoken keeps a copy of any ranks file it reads, keyed by the path; a bad copy must not be used.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    bundled = str(data._asset("gpt2.tiktoken"))
    (tmp_path / hashlib.sha1(bundled.encode()).hexdigest()).write_bytes(b"SGVsbG8= 0\n")
    data._gpt2_encoding.cache_clear()
    try:
        assert data.get_tokenizer("gpt2").encode("Hello world").tolist() == [15496, 995]
    finally:
        data._gpt2_encoding.cache_clear()


def test_gpt2_decode_inverts_encode_on_the_mini_valid_text(gpt2, mini_texts):
    ids = gpt2.encode(mini_texts["valid"])
    assert gpt2.decode(ids) == mini_texts["valid"]
    assert gpt2.decode(torch.from_numpy(ids[:50].astype(np.int32))) == gpt2.decode(ids[:50].tolist())


def test_bytes_tokenizer_gives_one_token_per_utf8_byte(mini_texts):
    tokenizer = data.get_tokenizer("bytes")
    ids = tokenizer.encode(mini_texts["train"])
    assert tokenizer.n_vocab == 256
    assert len(ids) == len(mini_texts["train"].encode("utf-8")) == 1_290_590
    assert tokenizer.decode(ids) == mini_texts["train"]
    assert tokenizer.encode("é").tolist() == [0xC3, 0xA9]


def test_unknown_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="bytes"):
        data.get_tokenizer("sentencepiece")


@pytest.mark.parametrize("name", ["train", "valid"])
def test_chunked_parallel_encode_equals_one_encode_ordinary_call(single_call_encodings, name):
    text, expected = single_call_encodings[name]
    assert len(data._chunk_bounds(text, 2000)) > 400  # hundreds of cuts, so every kind of line start is crossed
    chunked = data._encode_gpt2(data._gpt2_encoding(), text, chunk_chars=2000)
    assert chunked.tolist() == expected


def test_chunk_boundary_rule_is_exact_on_text_built_to_break_it():
    fragments = [
        "word", " word", "Word", "123", " 45", "'s", "'ll", " '", "!!", " (", "@-@", "\n", " \n", "\n\n", "  ",
        " ", "\t", "\n\t", "\r\n", "\u3000", "\u00a0", "\x85", "\x1c", "\u2028", "é", " ñandú", "日本", " _x",
    ]
    rng = random.Random(0)
    text = "".join(rng.choice(fragments) for _ in range(20_000))
    encoding = data._gpt2_encoding()
    expected = encoding.encode_ordinary(text)
    cuts = data._chunk_bounds(text, 1)[1:-1]  # a cut at every position the rules allow
    assert sum(text[p] == " " for p in cuts) > 300 and sum(text[p] != " " for p in cuts) > 100  # both rules
    assert data._encode_gpt2(encoding, text, chunk_chars=1).tolist() == expected
    # The check can fail: cutting after every "\n" instead does change the tokens.
    naive = [tok for piece in text.split("\n") for tok in encoding.encode_ordinary(piece + "\n")]
    assert naive[:-1] != expected


# --- text -----------------------------------------------------------------------------------------------------


def test_bundled_assets_have_the_published_checksums():
    # The sha256 values of WikiText-2 raw's wiki.test.raw and wiki.valid.raw (as in the official zip) and of
    # the GPT-2 ranks file: the tests below that use the mini texts therefore test against those files.
    assets = Path(str(data._asset()))
    mini_train = lzma.decompress((assets / "mini" / "wiki.train.raw.xz").read_bytes())
    mini_valid = lzma.decompress((assets / "mini" / "wiki.valid.raw.xz").read_bytes())
    assert hashlib.sha256(mini_train).hexdigest() == TEST_RAW_SHA256
    assert hashlib.sha256(mini_valid).hexdigest() == VALID_RAW_SHA256
    assert (len(mini_train), mini_train.count(b"\n")) == (1_290_590, 4_358)
    assert (len(mini_valid), mini_valid.count(b"\n")) == (1_146_846, 3_760)
    assert hashlib.sha256((assets / "gpt2.tiktoken").read_bytes()).hexdigest() == GPT2_RANKS_SHA256


def test_mini_texts_are_the_wikitext2_test_and_valid_files(mini_texts):
    for split, sha256 in MINI_SHA256.items():
        assert hashlib.sha256(mini_texts[split].encode("utf-8")).hexdigest() == sha256


def test_hf_rows_to_text_reproduces_the_raw_file(tmp_path, mini_texts):
    path = tmp_path / "wiki.valid.raw"
    path.write_bytes(mini_texts["valid"].encode("utf-8"))
    # Rows exactly as the Hugging Face wikitext builder yields them.
    with open(path, encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    assert "" in rows and all(row == "" or row.endswith("\n") for row in rows)
    dataset = datasets.Dataset.from_dict({"text": rows})
    rebuilt = data.hf_rows_to_text(dataset["text"]).encode("utf-8")
    assert hashlib.sha256(rebuilt).hexdigest() == VALID_RAW_SHA256


def test_data_dir_texts_are_the_exact_file_contents(tmp_path, mini_texts):
    (tmp_path / "wiki.train.raw").write_bytes(mini_texts["train"].encode("utf-8"))
    (tmp_path / "wiki.valid.raw").write_bytes(b"line one\r\nline two\n")
    texts = data.load_split_texts("wikitext-103", data_dir=tmp_path)
    assert hashlib.sha256(texts["train"].encode("utf-8")).hexdigest() == TEST_RAW_SHA256
    assert texts["valid"] == "line one\r\nline two\n"


def test_missing_data_dir_file_raises_data_unavailable_naming_it(tmp_path):
    (tmp_path / "wiki.train.raw").write_text("some text\n")
    with pytest.raises(data.DataUnavailable, match="wiki.valid.raw") as caught:
        data.load_split_texts("wikitext-103", data_dir=tmp_path)
    assert "\n" not in str(caught.value)


def test_unknown_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="wikitext-103"):
        data.load_split_texts("ptb")
    with pytest.raises(ValueError):
        data.load_tokens("ptb", data.get_tokenizer("bytes"), tmp_path)


def test_unreachable_hub_fails_fast_with_a_one_line_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    # A fresh interpreter, because `datasets` reads these variables when it is first imported.
    script = (
        "from hlb_gpt.data import DataUnavailable, load_split_texts\n"
        "try:\n"
        "    load_split_texts('wikitext-103')\n"
        "except DataUnavailable as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('no DataUnavailable')\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=os.environ)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert "wikitext-103" in lines[0] and "--dataset mini" in lines[0] and "--data-dir" in lines[0]
    assert elapsed < 25


# --- token cache ----------------------------------------------------------------------------------------------


def test_mini_splits_have_the_published_gpt2_token_counts(mini_gpt2_tokens):
    assert mini_gpt2_tokens["train"].shape == (286_221,)
    assert mini_gpt2_tokens["valid"].shape == (249_887,)
    assert mini_gpt2_tokens["train"].dtype == torch.int32
    assert mini_gpt2_tokens["train"][:4].tolist() == [220, 198, 796, 5199]  # " \n = Robert"


def test_mini_bytes_tokens_count_utf8_bytes(tmp_path):
    tokens = data.load_tokens("mini", data.get_tokenizer("bytes"), tmp_path)
    assert tokens["train"].numel() == 1_290_590
    assert tokens["valid"].numel() == 1_146_846


class CountingEncode:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = data.Tokenizer.encode

        def encode(tokenizer, text):
            self.calls += 1
            return original(tokenizer, text)

        monkeypatch.setattr(data.Tokenizer, "encode", encode)


def cache_files(cache_dir: Path, split: str, suffix: str) -> list[Path]:
    return sorted(cache_dir.glob(f"*.{split}.*{suffix}"))


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_token_cache_is_reused_and_stored_as_uint16(tmp_path, small_data_dir, monkeypatch, name):
    tokenizer = data.get_tokenizer(name)
    counter = CountingEncode(monkeypatch)
    first = data.load_tokens("wikitext-2", tokenizer, tmp_path / "cache", small_data_dir)
    assert counter.calls == 2
    second = data.load_tokens("wikitext-2", tokenizer, tmp_path / "cache", small_data_dir)
    assert counter.calls == 2
    for split in ("train", "valid"):
        assert torch.equal(first[split], second[split])
        assert second[split].dtype == torch.int32
        [bin_path] = cache_files(tmp_path / "cache", split, ".bin")
        meta = json.loads(bin_path.with_suffix(".json").read_text())
        assert bin_path.stat().st_size == 2 * first[split].numel()
        assert meta["dtype"] == "<u2" and meta["n_tokens"] == first[split].numel()
        assert all(field in bin_path.name for field in ("data-dir", split, name, meta["text_sha256"][:16]))
    text = (small_data_dir / "wiki.valid.raw").read_bytes().decode("utf-8")
    assert second["valid"].tolist() == tokenizer.encode(text).tolist()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-2])


def flip_one_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [truncate, flip_one_bit, lambda p: p.with_suffix(".json").unlink()])
def test_damaged_token_cache_is_detected_logged_and_rebuilt(tmp_path, small_data_dir, monkeypatch, caplog, damage):
    tokenizer = data.get_tokenizer("gpt2")
    cache = tmp_path / "cache"
    expected = data.load_tokens("wikitext-2", tokenizer, cache, small_data_dir)
    [bin_path] = cache_files(cache, "valid", ".bin")
    damage(bin_path)
    counter = CountingEncode(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="hlb_gpt.data"):
        rebuilt = data.load_tokens("wikitext-2", tokenizer, cache, small_data_dir)
    assert counter.calls == 1  # only the damaged split is tokenized again
    assert torch.equal(rebuilt["valid"], expected["valid"])
    assert [r.levelno for r in caplog.records if bin_path.name in r.getMessage()] == [logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hlb_gpt.data"):
        again = data.load_tokens("wikitext-2", tokenizer, cache, small_data_dir)
    assert counter.calls == 1 and not caplog.records  # the rebuilt entry is sound
    assert torch.equal(again["valid"], expected["valid"])


def test_changed_text_gets_a_new_cache_entry(tmp_path, small_data_dir):
    tokenizer = data.get_tokenizer("bytes")
    cache = tmp_path / "cache"
    data.load_tokens("wikitext-2", tokenizer, cache, small_data_dir)
    [old] = cache_files(cache, "train", ".bin")
    (small_data_dir / "wiki.train.raw").write_bytes(b" = New text = \n")
    tokens = data.load_tokens("wikitext-2", tokenizer, cache, small_data_dir)
    assert tokens["train"].tolist() == list(b" = New text = \n")
    assert len(cache_files(cache, "train", ".bin")) == 2 and old.exists()


def test_sidecar_with_another_key_is_treated_as_stale(tmp_path, small_data_dir, caplog):
    tokenizer = data.get_tokenizer("bytes")
    cache = tmp_path / "cache"
    expected = data.load_tokens("wikitext-2", tokenizer, cache, small_data_dir)
    [bin_path] = cache_files(cache, "train", ".bin")
    meta_path = bin_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = "gpt2"
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="hlb_gpt.data"):
        tokens = data.load_tokens("wikitext-2", tokenizer, cache, small_data_dir)
    assert torch.equal(tokens["train"], expected["train"])
    assert any("stale" in r.getMessage() for r in caplog.records)


# --- batch sampler --------------------------------------------------------------------------------------------


def arange_tokens(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32)


def test_sampler_with_the_same_seed_gives_the_same_batches():
    a, b = data.BatchSampler(arange_tokens(10_000), seed=3), data.BatchSampler(arange_tokens(10_000), seed=3)
    for seq_len in (8, 32, 8):
        xa, ya = a.sample(4, seq_len)
        xb, yb = b.sample(4, seq_len)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_sampler_with_another_seed_gives_other_batches():
    xa, _ = data.BatchSampler(arange_tokens(10_000), seed=0).sample(8, 16)
    xb, _ = data.BatchSampler(arange_tokens(10_000), seed=1).sample(8, 16)
    assert not torch.equal(xa, xb)


def test_sampler_targets_are_inputs_shifted_by_one_token():
    tokens = torch.randint(0, 50_000, (5_000,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    x, y = data.BatchSampler(tokens, seed=0).sample(16, 64)
    assert x.shape == y.shape == (16, 64)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Same seed on arange tokens reveals the start offsets the first sampler used.
    positions = data.BatchSampler(arange_tokens(5_000), seed=0).sample(16, 64)[0][:, 0]
    assert torch.equal(x, tokens[positions[:, None] + torch.arange(64)].long())
    assert torch.equal(y, tokens[positions[:, None] + torch.arange(1, 65)].long())


def test_sampler_offsets_cover_exactly_the_valid_range():
    seq_len = 5
    sampler = data.BatchSampler(arange_tokens(seq_len + 3), seed=0)
    starts = set()
    for _ in range(50):
        x, y = sampler.sample(8, seq_len)
        starts.update(x[:, 0].tolist())
        assert int(y.max()) <= seq_len + 2
    assert starts == {0, 1, 2}


def test_sampler_rejects_a_split_shorter_than_one_window():
    with pytest.raises(ValueError, match="seq_len"):
        data.BatchSampler(arange_tokens(8), seed=0).sample(2, 8)


def test_sampler_state_round_trip_continues_the_same_stream():
    sampler = data.BatchSampler(arange_tokens(10_000), seed=7)
    for _ in range(3):
        sampler.sample(4, 16)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)  # as a checkpoint would
    expected = [sampler.sample(4, 16) for _ in range(3)]
    resumed = data.BatchSampler(arange_tokens(10_000), seed=123)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for (xe, ye), (xr, yr) in zip(expected, (resumed.sample(4, 16) for _ in range(3))):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)


def test_sampler_state_for_other_data_is_rejected():
    state = data.BatchSampler(arange_tokens(100), seed=0).state_dict()
    with pytest.raises(ValueError, match="100"):
        data.BatchSampler(arange_tokens(200), seed=0).load_state_dict(state)


# --- evaluation windows ---------------------------------------------------------------------------------------


def test_eval_windows_are_consecutive_non_overlapping_windows_from_the_start():
    x, y = data.eval_windows(arange_tokens(101), seq_len=10, max_tokens=None)
    assert x.shape == y.shape == (10, 10)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.arange(100))
    assert torch.equal(y, x + 1)


def test_eval_windows_are_the_same_on_every_call(mini_gpt2_tokens):
    x1, y1 = data.eval_windows(mini_gpt2_tokens["valid"], seq_len=256, max_tokens=None)
    x2, y2 = data.eval_windows(mini_gpt2_tokens["valid"], seq_len=256, max_tokens=None)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == ((249_887 - 1) // 256, 256)


def test_eval_windows_use_only_the_first_max_tokens():
    x, y = data.eval_windows(arange_tokens(1_000), seq_len=10, max_tokens=31)
    assert x.shape == (3, 10)
    assert int(y.max()) == 30


@pytest.mark.parametrize("max_tokens", [None, 0])
def test_eval_windows_use_the_whole_split_without_a_limit(max_tokens):
    x, _ = data.eval_windows(arange_tokens(1_000), seq_len=10, max_tokens=max_tokens)
    assert x.shape == (99, 10)


def test_eval_windows_reject_a_split_shorter_than_one_window():
    with pytest.raises(ValueError, match="seq_len"):
        data.eval_windows(arange_tokens(10), seq_len=10, max_tokens=None)
    with pytest.raises(ValueError, match="--eval-tokens"):
        data.eval_windows(arange_tokens(1_000), seq_len=10, max_tokens=5)


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_token_cache_files_get_the_mode_the_umask_gives_a_normal_file(tmp_path, small_data_dir, umask, mode):
    old = os.umask(umask)
    try:
        data.load_tokens("wikitext-2", data.get_tokenizer("bytes"), tmp_path / "cache", small_data_dir)
        (tmp_path / "normal").write_bytes(b"")
    finally:
        os.umask(old)
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 4  # a .bin and a .json per split
    assert {f.stat().st_mode & 0o777 for f in files} == {mode} == {(tmp_path / "normal").stat().st_mode & 0o777}


def test_a_data_dir_cache_entry_says_it_came_from_a_folder(tmp_path, small_data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="hlb_gpt.data"):
        data.load_tokens("wikitext-103", data.get_tokenizer("bytes"), tmp_path / "cache", small_data_dir)
    assert all(p.name.startswith("data-dir.") for p in (tmp_path / "cache").iterdir())
    assert f"tokenizing {small_data_dir} train with bytes" in caplog.text and "wikitext-103" not in caplog.text
