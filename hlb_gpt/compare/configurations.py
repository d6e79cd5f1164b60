"""Which runs are one configuration, which configuration is a run's baseline, and how configurations are labelled.

A configuration is every recorded setting but the seed, the versions and the bookkeeping, without the settings
the run's components (`hlb_gpt.components`) do not read, with its environment (data sha256, device, precision,
compile, world size) as the run really had it. Its baseline is its optimizer's plain counterpart, unfiltered
(AdamW for AdamW and GrokAdamW runs, Muon for Muon runs), equal in all else, environment included
(docs/DESIGN.md, section 11).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Sequence

from hlb_gpt import components
from hlb_gpt.config import BOOKKEEPING, RunConfig

# Never part of a configuration: the seed pairs runs, versions differ between machines, and the bookkeeping
# settings (defined once in config.py, with resume) do not change what is measured.
# The attention kernel computes the same function (to float rounding), as --device and --compile do.
IRRELEVANT_KEYS = BOOKKEEPING | {"seed", "versions", "data_source", "checkpoint_cadence", "attention",
                                  "resolved_attention"}
# What a run ran on and how, as it really had it; each is a separate configuration (and a note).
ENVIRONMENT_KEYS = ("data", "device", "precision", "compile", "world_size")
# The recorded fields the environment is read from; the key holds the resolved values instead.
_ENVIRONMENT_SOURCES = frozenset({"text_sha256", "dataset", "data_dir", "device", "resolved_device", "precision",
                                  "resolved_precision", "compile", "world_size"})

Key = tuple[tuple[str, Any], ...]


def group_key(config: dict[str, Any]) -> Key:
    """The configuration a run belongs to: every setting that changes the experiment, but the seed."""
    return key_of(normalise_config(config))


def key_of(normalised: dict[str, Any]) -> Key:
    """The key of an already normalised config."""
    return tuple(sorted((k, hashable(v)) for k, v in normalised.items()))


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without irrelevant keys and without settings this kind of run does not use, with its
    environment (`ENVIRONMENT_KEYS`) as the run had it."""
    cfg = {**_DEFAULTS, **config}  # runs recorded before a setting existed ran with its default
    drop = set(IRRELEVANT_KEYS) | _ENVIRONMENT_SOURCES | components.unused_settings(cfg)
    if isinstance(cfg.get("text_sha256"), dict):
        drop.add("train_tokens")  # the text and the tokenizer decide it
    return {**{k: v for k, v in cfg.items() if k not in drop}, **environment(cfg)}


def baseline_config(config: dict[str, Any]) -> dict[str, Any]:
    """The normalised config of the unfiltered configuration equal to `config` in every other setting, on its
    optimizer's plain counterpart (the filter's effect is measured on the optimizer it feeds)."""
    return normalise_config({**config, **components.plain_counterpart(config)})


def environment(config: dict[str, Any]) -> dict[str, Any]:
    """Data, device, precision, compile and world size as the run had them (`auto` resolved where recorded)."""
    device = str(config.get("resolved_device") or config.get("device") or "").split(":")[0]
    compile_ = config.get("compile")
    return {
        "data": data_id(config),
        "device": device,
        "precision": config.get("resolved_precision") or _old_precision(config, device),
        # As the device does by default (train() compiles on CUDA only), or not: --compile on CUDA is the default.
        "compile": "default" if compile_ is None or compile_ == (device == "cuda") else ("on" if compile_ else "off"),
        "world_size": config.get("world_size", 1),
    }


def _old_precision(config: dict[str, Any], device: str) -> Any:
    """What --precision auto meant for runs recorded before config.json held the resolved precision: bf16 for
    language models on CUDA, fp32 otherwise (the grokking task trains in fp32 unless asked)."""
    precision = config.get("precision")
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" and components.task_of(config).bf16 else "fp32"


def data_id(config: dict[str, Any]) -> str:
    """The sha256 of the training and validation text, or, for runs recorded before config.json held it, where
    the text came from (the --data-dir, else the dataset)."""
    sha = config.get("text_sha256")
    if isinstance(sha, dict) and sha.get("train"):
        return f"sha256:{sha['train']}/{sha.get('valid')}"
    return str(config.get("data_dir") or config.get("dataset"))


def with_data_hashes(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configs, where one recorded without its data's sha256 takes the sha of the others read from the same
    place (dataset and --data-dir), when they all agree: old and new runs of one corpus stay one configuration."""
    seen: dict[str, set[Any]] = {}
    for cfg in configs:
        if isinstance(cfg.get("text_sha256"), dict):
            seen.setdefault(str(cfg.get("data_dir") or cfg.get("dataset")), set()).add(hashable(cfg["text_sha256"]))
    out = []
    for cfg in configs:
        known = seen.get(str(cfg.get("data_dir") or cfg.get("dataset")), set())
        if "text_sha256" not in cfg and len(known) == 1:
            cfg = {**cfg, "text_sha256": dict(next(iter(known)))}
        out.append(cfg)
    return out


def data_sources(configs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each data sha's source as the first run that read it recorded it: its --data-dir, else its dataset."""
    sources: dict[str, str] = {}
    for cfg in configs:
        if isinstance(cfg.get("text_sha256"), dict):
            sources.setdefault(data_id(cfg), str(cfg.get("data_dir") or cfg.get("dataset")))
    return sources


def environment_difference(a: dict[str, Any], b: dict[str, Any], sources: dict[str, str] | None = None) -> str | None:
    """`device (cpu vs cuda)` when normalised configs `a` and `b` differ only in their environment, else None.
    `sources` names where each data sha's text was read (`data_sources`)."""
    differ = {k for k in set(a) | set(b) if hashable(a.get(k)) != hashable(b.get(k))}
    if not differ or not differ <= {*ENVIRONMENT_KEYS, "train_tokens"}:  # runs recorded before the data sha
        return None

    def text(key: str, value: Any) -> str:
        where = (sources or {}).get(value) if key == "data" else None
        return f"{_format_value(key, value)} from {where}" if where else _format_value(key, value)

    return " and ".join(f"{k} ({text(k, a.get(k))} vs {text(k, b.get(k))})"
                        for k in (*ENVIRONMENT_KEYS, "train_tokens") if k in differ)


def short_label(config: dict[str, Any], gain: bool = True) -> str:
    """`baseline`, `ema α0.9 g0.1`, `ma w100 g5` or `grokadamw α0.98 g2` (without ` g…` if not `gain`); Muon
    runs start with `muon` (`muon baseline`, `muon ema α0.9 g0.1`)."""
    return components.label({**_DEFAULTS, **config}, gain)


def labels(configs: dict[Key, dict[str, Any]]) -> dict[Key, tuple[str, str]]:
    """(label, other settings) per normalised config: the short label plus every other setting that differs
    between the configurations."""
    values: dict[str, set] = {}
    identity = components.identity_settings()
    for cfg in configs.values():
        for k, v in cfg.items():
            if k not in identity:
                values.setdefault(k, set()).add(hashable(v))
    varying = sorted(k for k, vs in values.items() if len(vs) > 1)
    out, used = {}, set()
    for key, cfg in configs.items():
        settings = " ".join(f"{k}={_format_value(k, cfg[k])}" for k in varying if k in cfg)
        label = " ".join(filter(None, [short_label(cfg), settings]))
        base, i = label, 2
        while label in used:  # only if two settings print alike (e.g. floats equal to 6 digits)
            label, i = f"{base} #{i}", i + 1
        used.add(label)
        out[key] = (label, settings)
    return out


def hashable(value: Any) -> Any:
    """`value` with dicts and lists as tuples, so configs can be keys and set members."""
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    return value


def _format_value(key: str, value: Any) -> str:
    if key == "data" and isinstance(value, str) and value.startswith("sha256:"):
        return value[len("sha256:"):][:8]  # the training text's; enough to tell corpora apart in a label
    return f"{value:g}" if isinstance(value, float) else str(value)


# Unset (None) included: a run recorded before --train-tokens existed is one configuration with a new run without it.
_DEFAULTS = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}
