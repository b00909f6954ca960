"""Typed job configs: defaults (the dataclass), then a YAML file, then CLI flags.

Every dataclass field becomes a flag ``--field-name``; lists take several values; bools take
``--flag`` / ``--no-flag``. ``--config FILE.yaml`` holds the same keys (snake_case)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the valid choices."""


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional[...]; return (type, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    tp, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, (str, int, float)):
            value = [value]
        return [_coerce(name, item, v) for v in value]
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected a boolean, got {value!r}")
        return bool(value)
    try:
        return tp(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from e


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type[T], data: dict[str, Any], *, base: T | None = None, source: str = "config") -> T:
    """Overlay ``data`` on ``base`` (or the defaults). Unknown keys are an error that lists the valid ones."""
    types_ = field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(types_)}")
    obj = base if base is not None else cls()
    updates = {k: _coerce(k, types_[k], v) for k, v in data.items()}
    return dataclasses.replace(obj, **updates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, help_text: dict[str, str] | None = None) -> None:
    help_text = help_text or {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(field_types(cls)[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        h = help_text.get(f.name, "")
        h = f"{h} (default: {default!r})" if h else f"default: {default!r}"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif typing.get_origin(tp) in (list, tuple):
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=h)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=h, metavar=f.name.upper())


def parse(cls: type[T], argv: list[str] | None, description: str, help_text: dict[str, str] | None = None) -> T:
    """defaults -> --config YAML -> CLI flags."""
    return parse_explicit(cls, argv, description, help_text)[0]


def parse_explicit(cls: type[T], argv: list[str] | None, description: str,
                   help_text: dict[str, str] | None = None) -> tuple[T, set[str]]:
    """As ``parse``, also returning the keys that the YAML file or the flags set."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML file with config keys (overridden by flags)")
    add_dataclass_args(parser, cls, help_text)
    ns = parser.parse_args(argv)
    cfg, explicit = cls(), set()
    try:
        if ns.config:
            data = load_yaml(ns.config)
            cfg = from_dict(cls, data, base=cfg, source=ns.config)
            explicit |= set(data)
        flags = {k: v for k, v in vars(ns).items() if k != "config" and v is not None}
        cfg = from_dict(cls, flags, base=cfg, source="command line")
    except (ConfigError, OSError) as e:
        parser.error(str(e))
    return cfg, explicit | set(flags)


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
