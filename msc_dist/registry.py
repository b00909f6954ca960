"""The detector registry: named detectors, each an index root of published versions.

A detector is a name (at most two ``/``-separated segments, each ``[a-z0-9][a-z0-9_-]*``: no
dots, so no ``..``) bound to the live version of its index root, whose manifest names the
checkpoint that built it. The registry is a folder or an s3:// prefix:

    default.json                     {"detector": NAME}: what /v1/score serves (``msc detectors default``)
    NAME/current.json                the pointer to NAME's live version (msc_dist/index/versions.py)
    NAME/versions/<id>/...           the versions, as an embedding job's --out holds them
    NAME/removed.json                the pointer a ``msc detectors remove`` took away (files kept)

``msc embed --detector NAME`` publishes into ``REGISTRY/NAME/`` exactly as into any --out: the
pointer write is the one commit point, so two publishes of one detector at once leave one of
them live and whole. A detector is live while its pointer exists; ``remove`` moves the pointer
to removed.json (a running app answers 404 within its poll interval) and ``--purge`` deletes the
files too."""

from __future__ import annotations

import json
import os
import re
import time

from msc_dist import storage
from msc_dist.config import ConfigError
from msc_dist.index.versions import MANIFEST, POINTER, read_manifest, read_pointer

DEFAULT_REGISTRY = os.path.join("~", "msc_runs", "registry")
DEFAULT_FILE = "default.json"
REMOVED = "removed.json"
SEGMENT = re.compile(r"[a-z0-9][a-z0-9_-]*")
NAME_RULE = "at most two '/'-separated segments, each [a-z0-9][a-z0-9_-]* (e.g. 'bottle' or 'plant-a/bottle')"


class UnknownDetector(LookupError):
    """No live detector of that name in the registry (a 404 for HTTP clients)."""


def valid_name(name: str) -> bool:
    parts = str(name).split("/")
    return 0 < len(parts) <= 2 and all(SEGMENT.fullmatch(p) for p in parts)


def check_name(name: str) -> str:
    if not name or not valid_name(name):
        raise ConfigError(f"detector name {name!r} is not valid: {NAME_RULE}")
    return str(name)


def root(registry: str, name: str) -> str:
    """The index root of detector ``name``: the embedding job's --out for it."""
    return storage.join(storage.expand(registry), *check_name(name).split("/"))


def _children(url: str) -> list[str]:
    fs = storage.filesystem(url)
    path = storage.path_of(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))


def names(registry: str, removed: bool = False) -> list[str]:
    """The live detectors' names (``removed``: those removed but not purged), sorted."""
    reg = storage.expand(registry)

    def state(*parts: str) -> str | None:  # "live", "removed" (a republished one is live) or None
        if storage.exists(storage.join(reg, *parts, POINTER)):
            return "live"
        return "removed" if storage.exists(storage.join(reg, *parts, REMOVED)) else None

    want, out = "removed" if removed else "live", []
    for a in _children(reg):
        if not valid_name(a):
            continue
        s = state(a)
        if s is not None:
            out += [a] if s == want else []
        else:
            out += [f"{a}/{b}" for b in _children(storage.join(reg, a)) if valid_name(b) and state(a, b) == want]
    return out


def check_publishable(registry: str, name: str) -> str:
    """The index root for a publish of ``name``; refuses a name that would nest inside another
    detector's folder (``a/b`` where ``a`` is a detector) or hold one (``a`` where ``a/b`` is)."""
    check_name(name)
    reg = storage.expand(registry)
    parts = name.split("/")
    if len(parts) == 2 and (storage.exists(storage.join(reg, parts[0], POINTER)) or
                            storage.exists(storage.join(reg, parts[0], REMOVED))):
        raise ConfigError(f"detector {name!r}: {parts[0]!r} is a detector itself; a two-segment name needs a group "
                          "that is not a detector")
    if len(parts) == 1 and any(n.startswith(name + "/") for n in names(reg) + names(reg, removed=True)):
        raise ConfigError(f"detector {name!r}: it is a group of detectors already ({name}/...); choose another name")
    return root(reg, name)


def describe(registry: str, name: str) -> dict:
    """What one live detector serves: its live version, index size, threshold, model, checkpoint
    and when it was published. Raises UnknownDetector when it is not live."""
    r = root(registry, name)
    pointer = read_pointer(r)
    if pointer is None:
        raise UnknownDetector(f"no detector {name!r} in the registry (GET /v1/detectors lists them)")
    man, folder = read_manifest(r)
    return {"name": name, "version": man.version, "published": pointer.get("published"), "index_size": man.count,
            "dimension": man.dimension, "k": man.k, "threshold": man.threshold, "target_fpr": man.target_fpr,
            "model_id": man.model_id, "backbone": man.extra.get("backbone"), "image_size": man.extra.get("image_size"),
            "resize_mode": man.extra.get("resize_mode"), "checkpoint": man.extra.get("checkpoint"),
            "index_shards": len(man.shards), "versions": _versions(r)}


def _versions(r: str) -> list[str]:
    base = storage.join(r, "versions")
    return [v for v in _children(base) if storage.exists(storage.join(base, v, MANIFEST))]


def listing(registry: str) -> dict:
    """Every live detector (name, version, size, threshold, model id) and the default one."""
    reg = storage.expand(registry)
    default = get_default(reg)
    rows = []
    for n in names(reg):
        try:
            d = describe(reg, n)
        except UnknownDetector:  # removed while listed
            continue
        rows.append({k: d[k] for k in ("name", "version", "published", "index_size", "threshold", "model_id",
                                       "backbone", "image_size")} | {"default": n == default})
    return {"default": default, "detectors": rows}


def get_default(registry: str) -> str | None:
    """The default detector's name, or None when none is set (or it is no longer live)."""
    url = storage.join(storage.expand(registry), DEFAULT_FILE)
    if not storage.exists(url):
        return None
    name = json.loads(storage.read_bytes(url)).get("detector")
    if not name or not valid_name(name) or read_pointer(root(registry, name)) is None:
        return None
    return name


def set_default(registry: str, name: str) -> dict:
    reg = storage.expand(registry)
    if read_pointer(root(reg, name)) is None:
        raise ConfigError(f"no detector {name!r} in {registry}: valid: {', '.join(names(reg)) or 'none (publish one with msc embed --detector NAME)'}")
    storage.write_bytes_atomic(storage.join(reg, DEFAULT_FILE), json.dumps({"detector": name, "set": time.time()}).encode())
    return {"default": name}


def remove(registry: str, name: str, purge: bool = False) -> dict:
    """Take detector ``name`` off: its pointer moves to removed.json (the files stay); ``purge``
    deletes its folder too (also of a detector removed before)."""
    reg = storage.expand(registry)
    r = root(reg, name)
    pointer = read_pointer(r)
    was_removed = storage.exists(storage.join(r, REMOVED))
    if pointer is None and not (purge and was_removed):
        raise ConfigError(f"no detector {name!r} in {registry}: valid: {', '.join(names(reg)) or 'none'}"
                          + (" (it was removed already; --purge deletes its files)" if was_removed else ""))
    if pointer is not None:
        storage.write_bytes_atomic(storage.join(r, REMOVED), json.dumps({**pointer, "removed": time.time()}).encode())
        fs = storage.filesystem(r)
        fs.rm(storage.path_of(storage.join(r, POINTER)))
    if purge:
        fs = storage.filesystem(r)
        fs.rm(storage.path_of(r), recursive=True)
    return {"removed": name, "purged": purge, "version": (pointer or {}).get("version")}


# --- msc detectors list | show | remove | default: one typed config each -----------------------

from dataclasses import dataclass, field  # noqa: E402


@dataclass
class ListConfig:
    registry: str = DEFAULT_REGISTRY


@dataclass
class NameConfig(ListConfig):
    name: str | None = field(default=None, metadata={"positional": True})


@dataclass
class RemoveConfig(NameConfig):
    purge: bool = False


HELP = {"registry": "the detector registry: a folder or s3:// prefix", "name": "the detector: " + NAME_RULE,
        "purge": "also delete the detector's files (without it they stay, and only its pointer is taken away)"}


def run_command(command: str, cfg) -> dict:
    """``msc detectors COMMAND``: one JSON-able answer."""
    if command == "list":
        return listing(cfg.registry)
    if not cfg.name:
        raise ConfigError(f"msc detectors {command} needs a detector NAME: valid: "
                          f"{', '.join(names(storage.expand(cfg.registry))) or 'none in ' + cfg.registry}")
    if command == "show":
        try:
            return {**describe(cfg.registry, check_name(cfg.name)), "default": get_default(cfg.registry) == cfg.name}
        except UnknownDetector:
            raise ConfigError(f"no detector {cfg.name!r} in {cfg.registry}: valid: "
                              f"{', '.join(names(storage.expand(cfg.registry))) or 'none'}") from None
    if command == "remove":
        return remove(cfg.registry, cfg.name, cfg.purge)
    if command == "default":
        return set_default(cfg.registry, cfg.name)
    raise ConfigError(f"unknown command {command!r}: valid: list, show, remove, default")


COMMANDS = {"list": (ListConfig, "every live detector and the default one"),
            "show": (NameConfig, "one detector: its live version, index, threshold, model and kept versions"),
            "remove": (RemoveConfig, "take a detector off (a running app answers 404 within its poll interval); "
                                     "--purge deletes its files"),
            "default": (NameConfig, "the detector that POST /v1/score serves")}
