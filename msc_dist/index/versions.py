"""Versions of an index: the manifest of each, the pointer to the live one, publishing a new
version and deleting what nothing needs, and finding the version a reader asked for.

A (re)build writes a new version folder beside the live one and publishes it by replacing the
small pointer file: a job that dies part-way leaves the previous version live and loadable.
``keep_versions`` published versions are kept (the live one and the one before it by default);
older ones and unpublished leftovers of killed runs are deleted after publishing. Readers follow
the pointer, or pin a version by loading its folder."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

from msc_dist import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "current.json"
FORMAT = "msc-index/2"


class IndexMismatch(ValueError):
    """The index files do not match their manifest, or the manifest does not match the model."""



@dataclass
class ShardEntry:
    file: str  # relative to index/, e.g. "<version>/shard-0000.faiss"
    count: int
    sha256: str
    ids_file: str = ""
    ids_sha256: str = ""


@dataclass
class IndexManifest:
    dimension: int
    count: int
    shards: list[ShardEntry]
    model_id: str
    version: str = ""
    k: int = 2
    metric: str = "inner_product"
    factory: str = "Flat"
    threshold: float | None = None
    target_fpr: float | None = None
    calibration_samples: int = 0
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # backbone, image size, checkpoint, embeddings files, ...
    format: str = FORMAT
    # A version with a patch bank (msc_dist.patches): the PatchSpec dict + score_mode, map_threshold,
    # thresholds {global, patch, combined}, grid [h, w], dimension, count and the bank's shards
    # (one per index shard, same entries as the index's). None: no bank (global scores only).
    patch: dict | None = None

    @classmethod
    def from_json(cls, d: dict) -> "IndexManifest":
        d = dict(d)
        if d.get("format") != FORMAT:
            raise IndexMismatch(f"unknown index format {d.get('format')!r} (expected {FORMAT!r}): rebuild the index "
                                "with python -m msc_dist.embed")
        d["shards"] = [ShardEntry(**s) for s in d["shards"]]
        return cls(**d)

    def bank_shards(self) -> list[ShardEntry]:
        return [ShardEntry(**s) for s in (self.patch or {}).get("shards", [])]


def new_version() -> str:
    """Names sort in creation order (to the microsecond, UTC), which publishing relies on to tell
    older leftovers from a newer rebuild still running."""
    from datetime import datetime, timezone

    return f"v-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}-{uuid.uuid4().hex[:4]}"


def version_root(out: str, version: str) -> str:
    return storage.join(out, "versions", version)


def read_pointer(out: str) -> dict | None:
    url = storage.join(out, POINTER)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


# An unpublished version folder younger than this may be a publish still running (another
# process writing the same index root): cleanup leaves it alone.
LEFTOVER_AGE_S = 3600.0


def version_time(version: str) -> float | None:
    """The creation time (UTC epoch seconds) a version name records, or None for another name."""
    from datetime import datetime, timezone

    try:
        return datetime.strptime(version[2:24], "%Y%m%d-%H%M%S-%f").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def publish(out: str, man: IndexManifest, keep_versions: int = 2) -> None:
    """Make ``man`` (its files already under versions/<id>/) the live version: its manifest, then
    the pointer in one atomic write, the only commit point. Then delete what nothing needs:
    published versions beyond the newest ``keep_versions`` and unpublished leftovers older than
    this one by name and by ``LEFTOVER_AGE_S``, never the version the pointer names. Two publishes into one root at once
    leave one of them live and whole: neither deletes the other's files while it may still be
    writing them, and neither commits a version whose files are gone."""
    storage.safe_name(man.version, "index version", IndexMismatch)
    root = version_root(out, man.version)
    data = json.dumps(asdict(man), indent=1).encode()
    storage.write_bytes_atomic(storage.join(root, MANIFEST), data)
    missing = [e.file for e in man.shards if not storage.exists(storage.join(root, e.file))]
    if missing:
        raise IndexMismatch(f"index version {man.version}: {len(missing)} of its files are gone (e.g. {missing[0]}), "
                            "not published: was the version folder deleted while it was written?")
    pointer = {"format": "msc-index-pointer/1", "version": man.version, "manifest_sha256": storage.sha256(data),
               "published": time.time()}
    storage.write_bytes_atomic(storage.join(out, POINTER), json.dumps(pointer, indent=1).encode())
    base = storage.join(out, "versions")
    fs = storage.filesystem(base)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(storage.path_of(base), detail=False))
    published = [n for n in names if n != man.version and storage.exists(storage.join(base, n, MANIFEST))]
    keep = {man.version, *published[::-1][:max(0, keep_versions - 1)]}
    now = time.time()
    for n in names:
        if n in keep:
            continue
        if n not in published and (n > man.version or now - (version_time(n) or 0.0) < LEFTOVER_AGE_S):
            continue  # unpublished, newer or young: perhaps another publish still writing it
        live = read_pointer(out)
        if live is not None and live.get("version") == n:
            continue  # another publish made it live meanwhile
        log.info("deleting index version %s", n)
        try:
            fs.rm(storage.path_of(storage.join(base, n)), recursive=True)
        except FileNotFoundError:  # another publish's cleanup deleted it first
            pass


def resolve_version(path: str) -> str:
    """The version folder to load: the one ``current.json`` points at, or ``path`` itself when it
    is a version folder (a pinned version)."""
    if storage.exists(storage.join(path, MANIFEST)):
        return path
    pointer = read_pointer(path)
    if pointer is None:
        raise IndexMismatch(f"no {POINTER} (nor {MANIFEST}) in {path}: the index is missing or its job did not finish")
    return version_root(path, storage.safe_name(pointer["version"], storage.join(path, POINTER), IndexMismatch))


def read_manifest(path: str) -> tuple[IndexManifest, str]:
    """(manifest, version folder) of the live (or pinned) version, checked against the pointer."""
    root = resolve_version(path)
    url = storage.join(root, MANIFEST)
    if not storage.exists(url):
        raise IndexMismatch(f"{url} is missing: the pointer names a version that is not there")
    data = storage.read_bytes(url)
    pointer = read_pointer(path) if root != path else None
    if pointer is not None and pointer.get("manifest_sha256") not in (None, storage.sha256(data)):
        raise IndexMismatch(f"{url}: checksum does not match {POINTER}")
    return IndexManifest.from_json(json.loads(data)), root

