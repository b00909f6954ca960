"""Typed job configs: defaults (the dataclass), then a named preset (``--preset``, where the
class has ``PRESETS``), then a YAML file, then CLI flags.

One parser for every job, every ``msc`` verb and every benchmark, built from the dataclass:
each field becomes a flag ``--field-name`` (its help ends with its default); lists take several
values; bools take ``--flag`` / ``--no-flag``; a field with ``metadata={"positional": True}`` is
a positional argument instead. ``--config FILE.yaml`` holds the same keys (snake_case or
kebab-case). Flags win over the file, the file over the defaults.

A config that runs another job (evaluation trains; the benchmarks build a ``TrainConfig``)
``borrow``s that job's fields, types and help instead of repeating them by hand."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

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


def preset_values(cls: type, name: str) -> dict[str, Any]:
    """A config class's named preset (its ``PRESETS`` class attribute): the values that sit
    between its defaults and the YAML file. Unknown names are an error naming the valid ones."""
    presets = getattr(cls, "PRESETS", None)
    if not presets:
        raise ConfigError(f"{cls.__name__} has no presets")
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {sorted(presets)}")
    return {**presets[name], "preset": name}


def load_yaml(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


# ---------------------------------------------------------------------------------------------
# Borrowing another job's fields


def borrow(source: type, names: Iterable[str], cls_name: str, **defaults: Any) -> type:
    """A dataclass holding ``source``'s fields ``names`` with the same types and defaults
    (``defaults`` overrides some, on purpose and in one place). Subclass it with ``@dataclass``
    to add a job's own fields; ``project(cfg, source)`` then hands the shared fields back."""
    hints = field_types(source)
    by_name = {f.name: f for f in dataclasses.fields(source)}
    fields = []
    for n in names:
        if n not in by_name:
            raise KeyError(f"{source.__name__} has no field {n!r}")
        f = by_name[n]
        if n in defaults:
            v = defaults[n]
            spec = dataclasses.field(default_factory=lambda v=v: list(v)) if isinstance(v, list) else dataclasses.field(default=v)
        elif f.default_factory is not dataclasses.MISSING:
            spec = dataclasses.field(default_factory=f.default_factory)
        else:
            spec = dataclasses.field(default=f.default)
        fields.append((n, hints[n], spec))
    unknown = set(defaults) - set(names)
    if unknown:
        raise KeyError(f"defaults for fields that are not borrowed: {sorted(unknown)}")
    return dataclasses.make_dataclass(cls_name, fields)


def project(cfg: Any, target: type[T], **overrides: Any) -> T:
    """A ``target`` config from the fields of ``cfg`` that ``target`` also has, plus ``overrides``."""
    names = {f.name for f in dataclasses.fields(target)}
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    return target(**{**shared, **overrides})


# ---------------------------------------------------------------------------------------------
# The parser


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, help_text: dict[str, str] | None = None) -> None:
    """Every field of ``cls`` as a flag (or positional) whose default is None: what the user did
    not give stays None, so that ``--config`` values are only overridden by given flags."""
    help_text = help_text or {}
    defaults = cls()
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(types_[f.name])
        default = getattr(defaults, f.name)
        h = help_text.get(f.name, "")
        h = f"{h} (default: {default!r})" if h else f"default: {default!r}"
        h = h.replace("%", "%%")
        is_list = typing.get_origin(tp) in (list, tuple)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*" if is_list else "?", default=None, help=h,
                                metavar=f.name.upper())
        elif tp is bool:
            parser.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif is_list:
            parser.add_argument(_flag(f), dest=f.name, nargs="+", default=None, help=h, metavar=f.name.upper())
        else:
            parser.add_argument(_flag(f), dest=f.name, default=None, help=h, metavar=f.name.upper())


def add_config_args(parser: argparse.ArgumentParser, cls: type, help_text: dict[str, str] | None = None) -> None:
    """``--config FILE.yaml`` and every field of ``cls``; read them back with ``config_from_args``."""
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file with config keys (flags win over it)")
    add_dataclass_args(parser, cls, help_text)
    parser.set_defaults(_config_cls=cls)


def config_from_args(cls: type[T], ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None
                     ) -> tuple[T, set[str]]:
    """defaults -> --config YAML -> flags; also the keys that the file or the flags set.
    A bad value exits through ``parser.error`` (usage + message, status 2) when a parser is given."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg, explicit = cls(), set()
    try:
        path = getattr(ns, "config", None)
        data = load_yaml(path) if path else {}
        flags = {k: v for k, v in vars(ns).items() if k in names and v is not None and v != []}
        preset = flags.get("preset", data.get("preset"))
        if preset is not None:  # defaults -> preset -> YAML -> flags
            cfg = from_dict(cls, preset_values(cls, str(preset)), base=cfg, source=f"preset {preset}")
        if path:
            cfg = from_dict(cls, data, base=cfg, source=path)
            explicit |= set(data)
        cfg = from_dict(cls, flags, base=cfg, source="command line")
    except (ConfigError, OSError) as e:
        if parser is None:
            raise ConfigError(str(e)) from e
        parser.error(str(e))
    return cfg, explicit | set(flags)


def parser_for(cls: type, description: str, help_text: dict[str, str] | None = None,
               prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, cls, help_text)
    return parser


def parse(cls: type[T], argv: list[str] | None, description: str, help_text: dict[str, str] | None = None) -> T:
    """defaults -> --config YAML -> CLI flags."""
    return parse_explicit(cls, argv, description, help_text)[0]


def parse_explicit(cls: type[T], argv: list[str] | None, description: str,
                   help_text: dict[str, str] | None = None, prog: str | None = None) -> tuple[T, set[str]]:
    """As ``parse``, also returning the keys that the YAML file or the flags set."""
    parser = parser_for(cls, description, help_text, prog)
    ns = parser.parse_args(argv)
    return config_from_args(cls, ns, parser)


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
