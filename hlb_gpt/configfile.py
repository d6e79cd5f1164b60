"""`--config FILE`: a run's settings from a TOML file or from a previous run's config.json.

The file gives defaults, which the command line and HLB_GPT_* variables override; its values are checked here for
their type only, then parsed by the flags' own types (see `cli`), so a value in a file passes the checks a flag's
does. Keys are setting names (`weight_decay`; `weight-decay` as well); a list, or a comma string as on the
command line, makes a grid wherever a flag takes a list. A TOML file may also name a setting by its flag where the
two differ (`train_tokens` for `train_tokens_limit`); in a run's config.json that name is what the run recorded.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hlb_gpt import components
from hlb_gpt.config import ConfigError

# What a run's config.json records besides its settings (see `train.config_record`; the tasks' own, their
# components' `records`): how the run was resolved and where it ran. Given back with --config, they are what the
# run recorded, not settings.
RECORDED = frozenset({
    "data_source", "checkpoint_cadence", "resolved_device", "resolved_precision", "resolved_attention", "world_size",
    "n_params", "train_tokens", "text_sha256", "versions", "init_checkpoint", "init_step", "init_sha256",
})

KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def read_settings(path: Path, kinds: Mapping[str, tuple[type, ...]], grid: frozenset[str],
                  flag_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings `path` gives, by name, each value of one of its setting's `kinds` (or, for a setting in `grid`,
    a list of them or a comma string). A JSON null (an unset setting of a config.json) is left out: the default.
    `flag_names` maps the flag of a setting named otherwise to the setting, for TOML files."""
    settings: dict[str, Any] = {}
    aliases = {} if path.suffix.lower() == ".json" else dict(flag_names or {})
    for key, value in parse(path).items():
        name = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if name in RECORDED or any(name in task.records for task in components.TASKS.values()):
            continue
        if name not in kinds:
            raise ConfigError(f"--config {path}: unknown setting {key}{_suggestion(name, kinds)}")
        if name in settings:
            raise ConfigError(f"--config {path}: {name} is given twice")
        if value is not None:
            check_kind(path, name, value, kinds[name], name in grid)
        settings[name] = value
    return {name: value for name, value in settings.items() if value is not None}


def parse(path: Path) -> dict[str, Any]:
    """The table of a JSON file (`.json`) or a TOML file (any other name)."""
    data = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(data, object_pairs_hook=lambda pairs: _unique(path, pairs))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"--config {path}: not JSON ({exc})") from None
    else:
        try:
            import tomllib
        except ImportError:
            raise ConfigError(f"--config {path}: reading TOML needs Python 3.11 (tomllib); give the settings as a "
                              "JSON file") from None
        try:
            table = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--config {path}: not TOML ({exc}); give a TOML file or a run's config.json") from None
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path}: must hold a table of settings (got a {type(table).__name__})")
    return table


def check_kind(path: Path, name: str, value: Any, kinds: tuple[type, ...], grid: bool) -> None:
    """Refuse a value no flag would give: TOML and JSON type their values, and a number for a flag taking text or
    true for a number (both of which Python would convert) is a mistake in the file."""
    if grid and value == []:
        raise ConfigError(f"--config {path}: {name} = []: give at least one value")
    if grid and isinstance(value, list):
        for item in value:
            check_kind(path, name, item, kinds, grid=False)
        return
    if isinstance(value, list):
        raise ConfigError(f"--config {path}: {name} takes one value, not a list")
    accepted = (*kinds, str) if grid else kinds  # a comma string, as on the command line
    if not ((bool in accepted) if isinstance(value, bool) else isinstance(value, accepted)):
        wanted = " or ".join(KIND_NAMES[k] for k in kinds if not (k is int and float in kinds))
        raise ConfigError(f"--config {path}: {name} = {value!r}: expected {wanted}"
                          + (", or a list of them" if grid else ""))


def _unique(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: JSON itself would keep the last of two, silently."""
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise ConfigError(f"--config {path}: {key} is given twice")
        table[key] = value
    return table


def _suggestion(name: str, names: Mapping[str, Any]) -> str:
    """The setting meant: one the key begins (`warmup` for warmup_steps), else the closest in spelling."""
    close = [n for n in names if n.startswith(name)][:1] or difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean {close[0]}?" if close else ""
