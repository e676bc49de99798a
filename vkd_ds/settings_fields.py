"""The settings' typed-field machinery: a field's check (`number`, `choice`, `flag`, ... below: each
takes the key and its raw config value, and returns the value or raises VkdError naming the key), and
the conversion of a config node into a settings dataclass (`settings_from_node`: each field's check,
the value as plain Python, then the dataclass's own `__post_init__`). The settings' sections leave
omegaconf's types to this module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import signal
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vkd_ds.errors import VkdError

# A node of the composed config (the other settings modules name it so, and leave omegaconf to this one).
ConfigNode = DictConfig

# --- field checks: each takes (key, raw config value) and returns the value or raises VkdError ----


def checked(check: Callable[[str, Any], Any]):
    return field(metadata={"check": check})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(low=None, high=None, *, integer=False, optional=False, above=None):
    """A number (an integer if `integer`) in [low, high] and > `above`; null allowed if `optional`."""

    def check(key, value):
        if value is None and optional:
            return None
        kind = "an integer" if integer else "a number"
        if not _is_number(value) or (integer and not isinstance(value, int)):
            raise VkdError(f"config key `{key}` must be {kind}, got {value!r}")
        if low is not None and value < low:
            raise VkdError(f"config key `{key}` must be >= {low}, got {value}")
        if high is not None and value > high:
            raise VkdError(f"config key `{key}` must be <= {high}, got {value}")
        if above is not None and not value > above:
            raise VkdError(f"config key `{key}` must be > {above}, got {value}")
        return value

    return check


def auto_or(check_value):
    """The string `auto`, or a value `check_value` accepts."""

    def check(key, value):
        if value == "auto":
            return value
        try:
            return check_value(key, value)
        except VkdError as err:
            raise VkdError(f"{err} (or auto)") from None

    return check


def check_choice(key: str, value, choices) -> Any:
    if value not in choices:
        raise VkdError(f"config key `{key}` must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def choice(choices: Collection):
    """One of `choices`, read when a config is checked (a registry such as the divergences may grow)."""
    return lambda key, value: check_choice(key, value, choices)


def flag(key, value) -> bool:
    if not isinstance(value, bool):
        raise VkdError(f"config key `{key}` must be true or false, got {value!r}")
    return value


def required(key, value):
    if not value:
        raise VkdError(f"config key `{key}` is required (set it with {key}=...)")
    return value


def anything(key, value):
    return value


def numbers(count: int, low=None, high=None):
    """A list of `count` numbers, each in [low, high)."""

    def check(key, value):
        ok = isinstance(value, ListConfig) and len(value) == count and all(_is_number(v) for v in value)
        ok = ok and all((low is None or v >= low) and (high is None or v < high) for v in value)
        if not ok:
            where = "" if low is None else f" in [{low}, {high})"
            raise VkdError(f"config key `{key}` must be a list of {count} numbers{where}; got {value!r}")
        return value

    return check


def fraction(*, low_open=False, high_open=False):
    """A number in the interval from 0 to 1, each end open or closed."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"

    def check(key, value):
        number()(key, value)
        if value < 0 or value > 1 or (low_open and value == 0) or (high_open and value == 1):
            raise VkdError(f"config key `{key}` must be in {interval}, got {value}")
        return value

    return check


def existing_file(key, value):
    if value and not Path(value).is_file():
        raise VkdError(f"config key `{key}`: file not found: {value}")
    return value


def top_p_value(key, value):
    number(high=1.0)(key, value)
    if value <= 0:
        raise VkdError(f"config key `{key}` must be in (0, 1], got {value}")
    return value


def layer_pairs(key, value):
    if value != "uniform" and not isinstance(value, ListConfig):
        raise VkdError(f"config key `{key}` must be `uniform` or a list of [student, teacher] pairs; got {value!r}")
    return value


def glob_patterns(key, value):
    if not isinstance(value, ListConfig) or not all(isinstance(p, str) for p in value):
        raise VkdError(f"config key `{key}` must be a list of glob patterns (strings)")
    return value


def json_mapping(key, value):
    if not isinstance(value, DictConfig):
        raise VkdError(f"config key `{key}` must be a mapping of DeepSpeed JSON keys")
    return value


def signal_names(key, value):
    if not isinstance(value, ListConfig) or not all(isinstance(getattr(signal, str(n), None), int) for n in value):
        raise VkdError(f"config key `{key}` must be a list of signal names (e.g. SIGUSR1); got {value}")
    return value


def wandb_project_name(key, value):
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise VkdError(f"config key `{key}` must be a project name or null, got {value!r}")
    if importlib.util.find_spec("wandb") is None:
        raise VkdError(f"config key `{key}` is set but wandb is not installed (pip install wandb)")
    return value


def resume_from(key, value):
    if value not in ("auto", "never") and not (isinstance(value, str) and Path(value).is_dir()):
        raise VkdError(f"config key `{key}` must be auto, never or an existing checkpoint directory; got {value!r}")
    return value


def model_config(key, value):
    if value is not None and not isinstance(value, DictConfig):
        raise VkdError(f"config key `{key}` must be a model config (a mapping) or null, got {value!r}")
    return value


def data_inputs(*, optional: bool):
    """A path or glob, a prepared token store, or a list of paths/globs and {path, weight} mappings
    (the corpus' `resolve_sources` checks the files and weights when the store is prepared)."""

    def check(key, value):
        if value is None and optional:
            return None
        if isinstance(value, str) and value:
            return value
        if isinstance(value, ListConfig) and len(value) and all(isinstance(v, (str, DictConfig)) for v in value):
            return value
        raise VkdError(
            f"config key `{key}` must be a path, a glob or a list of them (each optionally "
            f"{{path: ..., weight: ...}}); got {value!r}"
        )

    return check


# --- a config node -> a settings dataclass --------------------------------------------------------


def raw_value(node: DictConfig, name: str, prefix: str):
    """The resolved value of `prefix.name`; VkdError naming the key if it is missing or broken."""
    key = f"{prefix}.{name}" if prefix else name
    try:
        return OmegaConf.select(node, name, throw_on_missing=True)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        if "Missing mandatory value" in msg:
            raise VkdError(f"config key `{key}` is required (set it with {key}=...)") from None
        raise VkdError(f"config key `{key}`: {msg}") from None


def settings_from_node(cls, node: DictConfig, prefix: str, given: dict[str, Any] | None = None):
    """An instance of the settings dataclass `cls` from the config node of the same keys: each
    field's check on its raw value, then the conversion to plain Python, then `__post_init__`."""
    if hasattr(cls, "from_node") and not given:
        return cls.from_node(node, prefix)
    hints = typing.get_type_hints(cls)
    values = dict(given or {})
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            child = raw_value(node, f.name, prefix)
            if not isinstance(child, DictConfig):
                raise VkdError(f"config key `{key}` must be a mapping, got {child!r}")
            values[f.name] = settings_from_node(kind, child, key)
        else:
            values[f.name] = _plain(f.metadata["check"](key, raw_value(node, f.name, prefix)), kind)
    return cls(**values)


def _plain(value, kind):
    """Config values as plain Python: lists as (nested) tuples, mappings as dicts, numbers as the
    field's type (an integer where a float is declared becomes a float)."""
    if isinstance(value, ListConfig):
        return _tuples(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    if kind is float or (isinstance(kind, types.UnionType) and float in kind.__args__):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
