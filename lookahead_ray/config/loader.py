"""Loading the typed config: YAML files (with an optional ``base:`` include), dotted overrides, type checks.

There is one override mechanism, :func:`apply_overrides` (``{"dotted.key": value}`` with typed values): the
CLI's ``key=value`` strings are parsed as YAML and go through it, and so does every Ray Tune trial. Errors
name the file (or ``<overrides>``) and the dotted key. Pure module: no ray / torch / transformers imports.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lookahead_ray.config.schema import LookaheadConfig
from lookahead_ray.config.typed import build
from lookahead_ray.errors import ConfigError

BASE_KEY = "base"
"""A config may start from another: ``base: relative/or/absolute.yaml``; its own keys are merged over it."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LookaheadConfig:
    """Load a YAML config and apply ``dotted.key=value`` overrides (values parsed as YAML).

    Overrides are merged into the file's mapping before the types are checked, so an override may fix a
    value the file gets wrong.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid value, naming file and key.
    """
    data = _read_yaml(Path(path), seen=()) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    for key, value in parse_overrides(overrides or []).items():
        check_override_key(key)  # a typo on the command line is the command line's error, not the file's
        _set_dotted(data, key, value, source)
    return build(LookaheadConfig, data, source)


def check_override_key(key: str) -> None:
    """``key`` names a field of the config (sections walked down to a plain field; below a mapping field such as
    ``train.deepspeed_overrides`` anything goes).

    Raises:
        ConfigError: "override KEY: unknown key ..." with the known keys at the first wrong part.
    """
    cls: Any = LookaheadConfig
    for depth, part in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(cls):
            return
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(key.split(".")[:depth])
            raise ConfigError(f"override {key}=...: unknown key {part!r}{f' in {where}' if where else ''} "
                              f"(known: {', '.join(sorted(fields))})")
        hint = typing.get_type_hints(cls)[part]
        options = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        cls = hint if dataclasses.is_dataclass(hint) else (options[0] if options else None)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    return out


def apply_overrides(cfg: LookaheadConfig, overrides: Mapping[str, Any],
                    source: str = "<overrides>") -> LookaheadConfig:
    """A new config: ``cfg`` with each ``"section.key": value`` set, then type-checked and validated again.

    >>> apply_overrides(LookaheadConfig(), {"preview.mode": "virtual", "train.learning_rate": 1e-5}).preview.mode
    'virtual'
    """
    data = cfg.to_dict()
    for key, value in overrides.items():
        _set_dotted(data, key, copy.deepcopy(value), source)
    return build(LookaheadConfig, data, source)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    source = str(path)
    if path.resolve() in seen:
        raise ConfigError(f"{source}: base includes form a cycle: {' -> '.join(map(str, seen))}")
    try:
        with path.open(encoding="utf-8") as stream:  # a YAML error then names the file, not "<unicode string>"
            loaded = yaml.safe_load(stream)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
    data = loaded or {}
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{source}: {BASE_KEY} must be a path to another config, got {base!r}")
    return _deep_merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
