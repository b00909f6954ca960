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
import textwrap
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
    """A config file's keys; a file that is not YAML is a ConfigError naming where it breaks."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path} is not valid YAML{where}: {what}; fix the file or drop --config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


# ---------------------------------------------------------------------------------------------
# Valid ranges of the numeric fields


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed (or, with ``lo_open`` / ``hi_open``, half-open) interval; None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if v != v:  # NaN
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        lo = "-inf" if self.lo is None else num(self.lo)
        hi = "inf" if self.hi is None else num(self.hi)
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


# The ranges that several jobs share, in one place.
MAX_PIXELS_RANGE = Range(1, 256_000_000)  # source pixels a decode may materialise (x 3-7 bytes each)
MAX_BYTES_RANGE = Range(1, 2**30)  # bytes read of one file, object or tar member
BATCH_RANGE = Range(1, 65_536)
SEED_RANGE = Range(0, 2**32 - 1)
CPUS_RANGE = Range(0, 1024, lo_open=True)
COUNT_RANGE = Range(1, 100_000)  # workers, actors, shards, ...


def ranges_of(cls: type) -> dict[str, Range]:
    """A config class's valid ranges: its ``RANGES`` class attribute (name -> Range), those of
    its base classes, and those of the fields it ``borrow``ed from another job's config."""
    out: dict[str, Range] = {}
    for c in reversed(cls.__mro__):
        src = c.__dict__.get("_borrowed_from")
        if src is not None:
            names = {f.name for f in dataclasses.fields(c)}
            out.update({k: v for k, v in ranges_of(src).items() if k in names})
        out.update(c.__dict__.get("RANGES", {}))
    return out


def check_ranges(cfg: Any) -> Any:
    """Every numeric field of ``cfg`` that its class gives a range (``ranges_of``) within it;
    else a ConfigError naming the flag and its valid range. None (an unset optional) passes.
    Called on every parsed config (``config_from_args``) and by each job's driver, before Ray."""
    by_name = {f.name: f for f in dataclasses.fields(cfg)}
    for name, rng in ranges_of(type(cfg)).items():
        if name not in by_name:
            raise KeyError(f"{type(cfg).__name__}.RANGES names {name!r}, which is not a field")
        value = getattr(cfg, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or isinstance(v, bool):
                continue
            if not isinstance(v, (int, float)) or v not in rng:
                raise ConfigError(f"{name} must be in {rng}, got {v!r} ({_flag(by_name[name])})")
    return cfg


def range_table(cls: type) -> list[tuple[str, str]]:
    """(flag, valid range) of each ranged field, for documentation."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return [(_flag(by_name[k]), str(r)) for k, r in ranges_of(cls).items()]


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
    cls = dataclasses.make_dataclass(cls_name, fields)
    cls._borrowed_from = source  # its fields' valid ranges too (``ranges_of``)
    return cls


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
    ranges = ranges_of(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(types_[f.name])
        default = getattr(defaults, f.name)
        h = help_text.get(f.name, "")
        if f.name in ranges:
            h = f"{h}; valid: {ranges[f.name]}" if h else f"valid: {ranges[f.name]}"
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
        check_ranges(cfg)
    except (ConfigError, OSError) as e:
        if parser is None:
            raise ConfigError(str(e)) from e
        # One line, no usage: the flags parsed; a value (or the file) is what is wrong.
        msg = f"--config {path}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        parser.exit(2, f"{parser.prog}: error: {msg}\n")
    return cfg, explicit | set(flags)


class HelpFormatter(argparse.HelpFormatter):
    """Flag help wrapped at spaces only: a name with a hyphen (``msc-noangular``, ``--eval-every``)
    or a default such as ``['knn', 'msc-fast']`` is never split across two lines."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class RawDescriptionFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter with the description printed as written."""


def parser_for(cls: type, description: str, help_text: dict[str, str] | None = None,
               prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=RawDescriptionFormatter)
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
