"""A run's weights as one safetensors file, with what is needed to rebuild the model in its metadata.

safetensors holds named tensors and a str -> str metadata table, and nothing else: loading one runs no code
(unlike a pickle, a torch checkpoint included), and any safetensors reader, in any language, can open it. The
metadata holds:

- `format`: `hlb-gpt/1`, the layout of this table (a new key is added, never renamed);
- `gpt_config`: JSON of the `GPTConfig` fields, so `GPT(GPTConfig(**json.loads(...)))` takes the weights;
- `config`: the run's whole config.json, as JSON text;
- `tokenizer`, `vocab_size` (the tokenizer's, before padding), `step`, `hlb_gpt_version`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import Tensor

import hlb_gpt
from hlb_gpt.config import ConfigError
from hlb_gpt.records import RecordWriteError, atomic_write_bytes
from hlb_gpt.trained import Trained

FORMAT = "hlb-gpt/1"


def export_metadata(trained: Trained) -> dict[str, str]:
    gpt = dataclasses.asdict(trained.model.config)
    return {
        "format": FORMAT,
        "gpt_config": json.dumps(gpt, sort_keys=True),
        "config": json.dumps(trained.config, sort_keys=True),
        "tokenizer": trained.tokenizer.name,
        "vocab_size": str(trained.tokenizer.n_vocab),
        "step": "" if trained.step is None else str(trained.step),
        "hlb_gpt_version": hlb_gpt.__version__,
    }


def unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor in its own contiguous storage. safetensors refuses tensors that share memory (tied weights,
    or views into one buffer, as a state_dict can hold); each name gets its own copy, so a reader needs no
    knowledge of which names were tied."""
    return {name: t.detach().cpu().contiguous().clone() for name, t in state.items()}


def check_out(out: Path, force: bool) -> None:
    """One-line errors for a file `export` must not or cannot write."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'model.safetensors'}")
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")


def write_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], out: Path, force: bool = False) -> Path:
    """Write `tensors` and `metadata` to `out`. An existing file is refused unless `force`; the file appears
    whole or not at all (written beside it, then renamed)."""
    from safetensors.torch import save  # an install requirement, imported only by this command

    out = Path(out)
    check_out(out, force)
    # Serialised in memory and written by us, not by `save_file`, whose files are private to their owner (0600):
    # an export is made to be shared, so it gets the permissions of any new file (the umask's).
    try:
        atomic_write_bytes(out, save(unshared(tensors), metadata=metadata))
    except RecordWriteError as exc:
        raise ConfigError(str(exc)) from None
    return out


def export_run(trained: Trained, out: Path, force: bool = False) -> Path:
    """The trained model's weights and metadata (see the module docstring) as a safetensors file at `out`."""
    return write_safetensors(trained.model.state_dict(), export_metadata(trained), out, force)
