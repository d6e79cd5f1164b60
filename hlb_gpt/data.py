"""Data: the WikiText splits, the two tokenizers, the token cache, the training sampler, the eval windows.

Text comes from the Hugging Face hub, a folder of raw files, or the bundled `mini` corpus; tokens are cached on
disk and checked on every load. Why the sampler has its own generator: docs/DESIGN.md, section 7.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.resources
import json
import logging
import lzma
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hlb_gpt.config import DATASETS, MINI_HAS_NO_TEST, TOKENIZERS, ConfigError
from hlb_gpt.durable import write_durably

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid")

_HUB_REPO = "Salesforce/wikitext"
_HUB_CONFIGS = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}
_HUB_SPLITS = {"train": "train", "valid": "validation"}
_RAW_FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw"}
# The test split, read only for --eval-test: the final number papers report, never looked at while training.
TEST_SPLIT = "test"
_HUB_TEST_SPLIT = "test"
TEST_FILE = "wiki.test.raw"
# mini trains on the WikiText-2 *test* split: the real train split (10.9 MB) is too big to ship.
_MINI_FILES = {"train": "wiki.train.raw.xz", "valid": "wiki.valid.raw.xz"}

_GPT2_RANKS_FILE = "gpt2.tiktoken"
_GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_GPT2_END_OF_TEXT = 50256

_CHUNK_CHARS = 1 << 20  # large enough that thread overhead is noise, small enough to spread over cores
_PROGRESS_MIN_CHARS = 5_000_000
_CACHE_FORMAT = 1


class DataUnavailable(Exception):
    """The requested text cannot be read; the message is one user-facing line that names the fix."""


# --------------------------------------------------------------------------------------------------------------
# Tokenizers


def token_dtype(n_vocab: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary of `n_vocab` tokens."""
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Tokenizer:
    """A named text <-> token-id mapping. Build it with `get_tokenizer`."""

    name: str
    n_vocab: int
    _encode: Callable[[str], np.ndarray] = field(repr=False, compare=False)
    _decode: Callable[[list[int]], str] = field(repr=False, compare=False)
    _token_bytes: Callable[[], np.ndarray] = field(repr=False, compare=False)  # UTF-8 bytes of each token id
    _decode_bytes: Callable[[list[int]], bytes] = field(repr=False, compare=False)

    @property
    def dtype(self) -> np.dtype:
        """The dtype `encode` returns and the cache stores (uint16 for both built-in tokenizers)."""
        return token_dtype(self.n_vocab)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as a 1-D array of `self.dtype`."""
        return self._encode(text)

    def decode(self, ids: Any) -> str:
        """Text of a sequence of token ids (a list, numpy array or tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        return self._decode(np.asarray(ids).reshape(-1).tolist())

    def n_bytes(self, ids: Any) -> int:
        """The UTF-8 bytes of the text that the token ids spell, counted token by token: exact even where a
        sequence starts or ends inside a character that several tokens share."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        return int(self._token_bytes()[np.asarray(ids).reshape(-1)].sum(dtype=np.int64))

    def decode_bytes(self, ids: Any) -> bytes:
        """The UTF-8 bytes token ids spell: those of the text they were encoded from, even where a cut falls
        inside a character."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        return self._decode_bytes(np.asarray(ids).reshape(-1).tolist())


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` (one of TOKENIZERS). Never touches the network."""
    if name == "gpt2":
        encoding = _gpt2_encoding()
        return Tokenizer(
            name="gpt2",
            n_vocab=encoding.n_vocab,
            _encode=functools.partial(_encode_gpt2, encoding),
            _decode=encoding.decode,
            _token_bytes=_gpt2_token_bytes,
            _decode_bytes=encoding.decode_bytes,
        )
    if name == "bytes":
        return Tokenizer(name="bytes", n_vocab=256, _encode=_encode_bytes, _decode=_decode_bytes,
                         _token_bytes=functools.partial(np.ones, 256, dtype=np.int64), _decode_bytes=bytes)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():  # -> tiktoken.Encoding; built once per process (~0.3 s)
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    with importlib.resources.as_file(_asset(_GPT2_RANKS_FILE)) as path:
        # A local path (no "://") is read straight from disk, never downloaded. tiktoken also keeps a copy in its
        # cache folder (TIKTOKEN_CACHE_DIR, else <tmp>/data-gym-cache) keyed by the path; with the expected hash,
        # a stale or damaged copy there is ignored and replaced instead of silently used.
        ranks = load_tiktoken_bpe(str(path), expected_hash=_GPT2_RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": _GPT2_END_OF_TEXT},
    )


@functools.lru_cache(maxsize=1)
def _gpt2_token_bytes() -> np.ndarray:
    encoding = _gpt2_encoding()
    return np.array([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)], dtype=np.int64)


def _encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def _decode_bytes(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


# Where text may be cut so that encoding the pieces separately gives exactly the tokens of the whole.
#
# tiktoken's GPT-2 pre-tokenizer (r50k_pat_str) is
#     '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
# scanned left to right. It has no look-behind and no anchor but end of text, so the pieces from a position
# where a piece starts depend only on the text from there on. A cut at p is therefore exact if, in the whole
# text, a piece starts at p, and the text before p alone splits into the same pieces. Both rules cut right
# after a "\n"; "\n" is whitespace, and only the three whitespace alternatives can match it.
#
# Rule A, "\n" then " " then a non-space c (the WikiText line start). The whitespace run W holding the "\n"
#   and the " " is followed by c. In the whole text, `\s++$` fails (not at the end), `\s+(?!\S)` backtracks
#   one character and takes W up to p (the piece ends in "\n"), and " c..." starts a new piece at p through
#   ` ?\p{L}++`, ` ?\p{N}++` or ` ?[^\s\p{L}\p{N}]++`. In the text before p, that same run ends the text and
#   `\s++$` takes exactly the same characters.
# Rule B, a non-space, then "\n", then a non-space. The "\n" is a run of one: in the whole text `\s+(?!\S)`
#   fails (c follows) and `\s` takes it alone; in the text before p, `\s++$` takes it alone. Either way the
#   piece is "\n", ending at p, and c starts the next piece.
# Pieces before the run never look past its first character, which lies before p.
#
# "Non-space" is spelled [\w!-~] (word characters and ASCII punctuation) rather than \S, because Python's and
# Rust's ideas of whitespace differ for a few control characters; no character of the class is whitespace in
# either. tests/test_data.py checks the rules on both WikiText files and on text built to stress them.
_TOKEN_BOUNDARY = re.compile(r"\n(?= [\w!-~])|(?<=[\w!-~])\n(?=[\w!-~])")


def _chunk_bounds(text: str, target_chars: int) -> list[int]:
    """Cut positions [0, ..., len(text)] about `target_chars` apart, each a provable GPT-2 token boundary."""
    bounds = [0]
    while len(text) - bounds[-1] > target_chars:
        match = _TOKEN_BOUNDARY.search(text, bounds[-1] + target_chars)
        if match is None:
            break
        bounds.append(match.end())
    bounds.append(len(text))
    return bounds


def _encode_gpt2(encoding, text: str, chunk_chars: int = _CHUNK_CHARS) -> np.ndarray:
    """`encoding.encode_ordinary(text)` as an array, computed over chunks in parallel threads."""
    bounds = _chunk_bounds(text, chunk_chars)
    spans = list(zip(bounds[:-1], bounds[1:]))
    n_threads = _n_cpus()
    dtype = token_dtype(encoding.n_vocab)
    group = 4 * n_threads  # chunks per batch call: sliced lazily so only a few copies of the text exist at once
    parts = []
    with tqdm(
        total=len(text),
        unit="char",
        unit_scale=True,
        desc="tokenizing",
        disable=len(text) <= _PROGRESS_MIN_CHARS,
    ) as progress:
        for i in range(0, len(spans), group):
            pieces = [text[a:b] for a, b in spans[i : i + group]]
            for ids in encoding.encode_ordinary_batch(pieces, num_threads=n_threads):
                parts.append(np.array(ids, dtype=dtype))
            progress.update(sum(len(p) for p in pieces))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts)


def _n_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------------
# Text


def hf_rows_to_text(rows: Iterable[str]) -> str:
    """The raw split text from the `text` rows of the Hugging Face `wikitext` dataset.

    The wikitext builder (huggingface/datasets, datasets/wikitext/wikitext.py, `_generate_examples`, whose output
    the parquet files now served by Salesforce/wikitext hold) reads the raw file line by line in text mode and
    yields each line with its trailing "\\n" when `line.strip()` is non-empty, and "" otherwise. Blank lines in the raw
    WikiText files are always " \\n", so joining the rows with "" mapped back to " \\n" restores the file exactly.
    """
    return "".join(row if row else " \n" for row in rows)


def load_split_texts(dataset: str, data_dir: Path | None = None, test: bool = False) -> dict[str, str]:
    """{"train": text, "valid": text} of `dataset`, or of the raw files in `data_dir` when it is given; with
    `test`, also {"test": text}, the test split (wiki.test.raw in a `data_dir`).

    Raises ValueError for an unknown dataset and DataUnavailable when the text cannot be read (or, with `test`,
    for `mini`, whose training text is WikiText-2's test split).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is not None:
        files = {**_RAW_FILES, TEST_SPLIT: TEST_FILE} if test else _RAW_FILES
        return {split: _read_raw_file(Path(data_dir) / name) for split, name in files.items()}
    if dataset == "mini":
        if test:
            raise DataUnavailable(MINI_HAS_NO_TEST)
        return {
            split: lzma.decompress(_asset("mini", name).read_bytes()).decode("utf-8")
            for split, name in _MINI_FILES.items()
        }
    return _load_from_hub(dataset, {**_HUB_SPLITS, TEST_SPLIT: _HUB_TEST_SPLIT} if test else _HUB_SPLITS)


def data_source(dataset: str, data_dir: Path | str | None) -> str:
    """Where a run's text comes from, in words for its records: with --data-dir, the folder, not --dataset."""
    if data_dir is not None:
        return f"folder {Path(data_dir).resolve()}"
    if dataset == "mini":
        return "mini, bundled (WikiText-2 raw test as train, valid as valid)"
    return f"{dataset}, Hugging Face {_HUB_REPO} {_HUB_CONFIGS[dataset]}"


def _read_raw_file(path: Path) -> str:
    # Bytes, not read_text: text mode would turn "\r\n" into "\n", and the split text is the file's exact contents.
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataUnavailable(
            f"missing data file {path} (--data-dir needs wiki.train.raw and wiki.valid.raw, and wiki.test.raw "
            "for --eval-test)"
        ) from None
    except OSError as error:
        raise DataUnavailable(f"cannot read data file {path} ({error.strerror or error})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataUnavailable(f"data file {path} is not UTF-8 text (bad byte at offset {error.start})") from None


def _load_from_hub(dataset: str, splits: dict[str, str]) -> dict[str, str]:
    config = _HUB_CONFIGS[dataset]
    columns = {}
    try:
        import datasets  # slow to import, and only needed here

        for split, hub_split in splits.items():
            columns[split] = datasets.load_dataset(_HUB_REPO, config, split=hub_split)["text"]
    except Exception as error:  # noqa: BLE001 -- any failure means the same thing to the user
        detail = " ".join(str(error).split())[:200]
        raise DataUnavailable(
            f"could not load {dataset} from the Hugging Face hub ({type(error).__name__}: {detail}); "
            "offline, use --dataset mini or --data-dir DIR with wiki.train.raw and wiki.valid.raw"
        ) from error
    return {split: hf_rows_to_text(column) for split, column in columns.items()}


def _asset(*parts: str):  # -> importlib.resources.abc.Traversable
    resource = importlib.resources.files("hlb_gpt") / "assets"
    for part in parts:
        resource = resource / part
    return resource


# --------------------------------------------------------------------------------------------------------------
# Token cache


def load_tokens(
    dataset: str, tokenizer: Tokenizer, cache_dir: Path, data_dir: Path | None = None
) -> dict[str, torch.Tensor]:
    """{"train": ids, "valid": ids}: 1-D int32 CPU tensors, read from the cache in `cache_dir` or built into it."""
    return load_data(dataset, tokenizer, cache_dir, data_dir).tokens


@dataclass(frozen=True)
class Data:
    """A dataset's tokens and what identifies its text wherever it was read from: the sha256 of each split.

    `tokens` and `text_sha256` hold "train" and "valid", and "test" when it was asked for: a run's config.json
    records the first two only, so adding --eval-test to a run does not change what identifies its data."""

    tokens: dict[str, torch.Tensor]
    text_sha256: dict[str, str]


def load_data(dataset: str, tokenizer: Tokenizer, cache_dir: Path, data_dir: Path | None = None,
              test: bool = False) -> Data:
    """The tokens of `load_tokens` (with `test`, the test split's too), with the sha256 of each split's text.

    One cache entry per (dataset, split, tokenizer, sha256 of the text): a raw little-endian token file plus a JSON
    sidecar with the key and the sha256 of the token bytes. A damaged or mismatched entry is logged and rebuilt.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    texts = load_split_texts(dataset, data_dir, test=test)
    source = "data-dir" if data_dir is not None else dataset  # a folder's text is not the named dataset's
    tokens, text_sha256 = {}, {}
    for split in texts:
        text = texts[split]
        key = {
            "format": _CACHE_FORMAT,
            "dataset": source,
            "split": split,
            "tokenizer": tokenizer.name,
            "n_vocab": tokenizer.n_vocab,
            "dtype": tokenizer.dtype.newbyteorder("<").str,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
        stem = f"{source}.{split}.{tokenizer.name}.{key['text_sha256'][:16]}"
        ids = _read_cache(cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json", key)
        if ids is None:
            logger.info("tokenizing %s %s with %s", data_dir if data_dir is not None else dataset, split,
                        tokenizer.name)
            ids = np.asarray(tokenizer.encode(text)).astype(np.dtype(key["dtype"]), copy=False)
            _write_cache(cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json", key, ids)
        tokens[split] = torch.from_numpy(ids.astype(np.int32))
        text_sha256[split] = key["text_sha256"]
    return Data(tokens, text_sha256)


def first_tokens(data: Data, n: int | None, tokenizer: Tokenizer) -> Data:
    """`data` with its training split cut to its first `n` tokens (--train-tokens; None: all of them), and the sha256
    of the training text those tokens spell in place of the whole split's, so that a run records the text it trained
    on (the whole split asked for by its size is the split's text). ConfigError if the split has fewer tokens."""
    if n is None:
        return data
    train = data.tokens["train"]
    check_train_tokens(n, len(train))
    spelled = tokenizer.decode_bytes(train[:n])
    return Data({**data.tokens, "train": train[:n]}, {**data.text_sha256, "train": hashlib.sha256(spelled).hexdigest()})


def check_train_tokens(n: int | None, available: int) -> None:
    """Refuse --train-tokens `n` beyond the `available` tokens of the training split (ConfigError, one line)."""
    if n is not None and n > available:
        raise ConfigError(f"--train-tokens {n} is more than the {available:,} tokens of the training split; "
                          f"ask for at most {available}, or leave it unset for the whole split")


def _read_cache(bin_path: Path, meta_path: Path, key: dict) -> np.ndarray | None:
    """The cached ids if the entry exists and checks out; None (with a warning if it was damaged) otherwise."""
    if not bin_path.exists() and not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        raw = bin_path.read_bytes()
        problem = _cache_problem(meta, raw, key)
    except (OSError, ValueError, TypeError, KeyError) as error:
        problem = f"unreadable ({type(error).__name__}: {error})"
    if problem:
        logger.warning("token cache %s is %s; rebuilding it", bin_path, problem)
        return None
    return np.frombuffer(raw, dtype=np.dtype(key["dtype"]))


def _cache_problem(meta: dict, raw: bytes, key: dict) -> str | None:
    for name, value in key.items():
        if meta.get(name) != value:
            return f"stale ({name} is {meta.get(name)!r}, expected {value!r})"
    expected_size = int(meta["n_tokens"]) * np.dtype(key["dtype"]).itemsize
    if len(raw) != expected_size:
        return f"corrupt ({len(raw)} bytes, expected {expected_size})"
    if hashlib.sha256(raw).hexdigest() != meta["token_sha256"]:
        return "corrupt (sha256 of the tokens does not match)"
    return None


def _write_cache(bin_path: Path, meta_path: Path, key: dict, ids: np.ndarray) -> None:
    raw = ids.tobytes()
    meta = {**key, "n_tokens": int(ids.size), "token_sha256": hashlib.sha256(raw).hexdigest()}
    # Tokens first, sidecar last: an entry counts only once its sidecar exists, and each file appears whole.
    _atomic_write(bin_path, raw)
    _atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))


def _atomic_write(path: Path, data: bytes) -> None:
    # Each writer has its own temporary name, so several processes (DDP ranks) may build the same entry at once;
    # the file is created as any file its user writes (umask), so a cache shared by a group stays readable.
    try:
        write_durably(path, lambda f: f.write(data))
    except OSError as error:
        raise _cache_unwritable(path, error) from None


def _cache_unwritable(path: Path, error: OSError) -> DataUnavailable:
    reason = "no space left on the device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return DataUnavailable(f"cannot write the token cache {path} ({reason}); free space there or choose "
                           "another folder with --data-cache")


# --------------------------------------------------------------------------------------------------------------
# Training batches and evaluation windows


class BatchSampler:
    """Seeded, deterministic sampler of training windows: batch order depends only on the seed."""

    def __init__(self, tokens: torch.Tensor, seed: int, device: torch.device | str = "cpu"):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D (got shape {tuple(tokens.shape)})")
        self.device = torch.device(device)
        self.tokens = tokens.to(self.device)
        self.seed = seed
        # Offsets come from a CPU generator, so a seed gives the same batches on every device.
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._positions: dict[int, torch.Tensor] = {}

    def sample(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, seq_len) int64 on the device; y[:, t] is the token after x[:, t]."""
        n = self.tokens.numel()
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
        if n < seq_len + 1:
            raise ValueError(f"the training split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(0, n - seq_len, (batch_size, 1), generator=self._generator)  # (B, 1)
        if self.device.type == "cuda":
            starts = starts.pin_memory()  # so the copy below is truly asynchronous
        starts = starts.to(self.device, non_blocking=True)
        index = starts + self._arange(seq_len)  # (B, T)
        return self.tokens[index].long(), self.tokens[index + 1].long()

    def _arange(self, seq_len: int) -> torch.Tensor:
        if seq_len not in self._positions:
            self._positions[seq_len] = torch.arange(seq_len, device=self.device)
        return self._positions[seq_len]

    def state_dict(self) -> dict:
        """Everything needed to continue the exact stream of batches."""
        return {"seed": self.seed, "n_tokens": self.tokens.numel(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["n_tokens"] != self.tokens.numel():
            raise ValueError(
                f"sampler state is for {state['n_tokens']} training tokens, but this split has {self.tokens.numel()}"
            )
        self.seed = state["seed"]
        self._generator.set_state(state["generator"].cpu())


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation set: X, Y of shape (n_windows, seq_len), int64, Y shifted one token ahead of X.

    Non-overlapping windows from the start of `tokens`, using only the first `max_tokens` tokens when given
    (None or 0 means the whole split).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive (got {seq_len})")
    used = tokens[:max_tokens] if max_tokens else tokens
    n_windows = (used.numel() - 1) // seq_len
    if n_windows < 1:
        limit = f" (--eval-tokens {max_tokens})" if max_tokens else ""
        raise ValueError(
            f"the validation split{limit} has {used.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a shorter --seq-len or more validation tokens"
        )
    span = n_windows * seq_len
    x = used[:span].reshape(n_windows, seq_len).long()
    y = used[1 : span + 1].reshape(n_windows, seq_len).long()
    return x, y
