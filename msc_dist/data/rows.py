"""Row-oriented reading for the Ray Data jobs (embedding, offline scoring).

Every byte is read once per pass: a read task streams one whole shard (or lists one prefix) and
yields decoded rows in blocks of ``block_rows``, so a block size smaller than a shard never
makes a task re-read the start of its shard. An undecodable sample or object is a row with an
error, never a crash. Each task reports the bytes it pulled from storage, so the jobs can print
``bytes_read / bytes_stored``.

Row columns: id, source, label (-1 = none), image (S, S, 3) uint8, error ("" = none),
bytes_read, bytes_stored (non-zero on the last row a task emits for a shard or object) and
stats_only (a row that carries only those byte counts, for a shard that kept no sample)."""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Iterator

import numpy as np

from msc_dist import storage
from msc_dist.data.decode import BadImage, Preprocess
from msc_dist.data.loader import LabelFilter
from msc_dist.data.shards import IMAGE_EXTS, ByteCounter, iter_samples

log = logging.getLogger(__name__)


def shard_items(counts: list[tuple[str, int | None]], keep: list[int] | None) -> list[dict]:
    """One read task per shard (shards known to keep no sample are left out). ``keep`` (labels
    kept, None = all) travels as JSON: Arrow turns an all-null column into floats."""
    return [{"url": u, "keep": json.dumps(keep)} for u, n in counts if n != 0]


class _Rows:
    """Accumulates decoded rows and hands them out as column blocks."""

    def __init__(self, size: int, encoded: bool = False):
        self.size, self.encoded = size, encoded
        self.clear()

    def clear(self) -> None:
        self.ids, self.sources, self.labels, self.images, self.errors, self.nbytes = [], [], [], [], [], []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, key: str, source: str, label: int | None, image: np.ndarray | None, error: str | None,
            nbytes: int = 0) -> None:
        self.ids.append(key)
        self.sources.append(source)
        self.labels.append(-1 if label is None else label)
        self.images.append(image)
        self.errors.append(error)
        self.nbytes.append(nbytes)

    def block(self, bytes_read: int = 0, bytes_stored: int = 0) -> dict:
        """The rows so far as one block; the byte counts go on its last row (on a stats-only row
        when there is none)."""
        stats_only = not self.ids
        if stats_only:
            self.add("", "", None, None, None)
        n = len(self.ids)
        read = np.array(self.nbytes, dtype=np.int64)
        stored = np.zeros(n, dtype=np.int64)
        read[-1] += bytes_read
        stored[-1] += bytes_stored
        blank = np.zeros((self.size, self.size, 3), np.uint8)
        pixels = ({"encoded": np.array([b"" if im is None else im for im in self.images], dtype=object)} if self.encoded
                  else {"image": np.stack([blank if im is None else im for im in self.images])})
        out = {
            "id": np.array(self.ids, dtype=object),
            "source": np.array(self.sources, dtype=object),
            "label": np.array(self.labels, dtype=np.int64),
            **pixels,
            # "" = no error (Arrow round-trips of None in object columns are not reliable)
            "error": np.array(["" if e is None else e for e in self.errors], dtype=object),
            "bytes_read": read,
            "bytes_stored": stored,
            "stats_only": np.array([stats_only] * n, dtype=bool),
        }
        self.clear()
        return out


def _decode(data: bytes | None, preprocess: Preprocess, max_pixels: int,
            why: str | None = None) -> tuple[np.ndarray | None, str | None]:
    try:
        if data is None and why:
            raise BadImage(why)
        return preprocess(data, max_pixels), None
    except BadImage as e:
        return None, str(e)


def _probe(data: bytes | None, max_pixels: int, why: str | None = None) -> tuple[bytes | None, str | None]:
    from msc_dist.data.device_decode import probe

    try:
        if data is None and why:
            raise BadImage(why)
        probe(data, max_pixels)
        return data, None
    except BadImage as e:
        return None, str(e)


def read_shards(batch: dict, preprocess: Preprocess, max_pixels: int, max_bytes: int, block_rows: int,
                encoded: bool = False) -> Iterator[dict]:
    """Ray Data map_batches fn (batch_size=1): stream each shard item once, keep the samples
    whose label passes ``keep``, decode them by the checkpoint's ``preprocess`` and yield blocks
    of ``block_rows`` rows.
    ``encoded``: check each image's header only and pass its bytes on (column ``encoded``), for
    actors that decode on their device."""
    size = preprocess.image_size
    for i in range(len(batch["url"])):
        url = str(batch["url"][i])
        kept = json.loads(str(batch["keep"][i]))
        keep = LabelFilter(None if kept is None else frozenset(int(x) for x in kept))
        rows, counter = _Rows(size, encoded), ByteCounter()
        try:
            for s in iter_samples(url, max_member_bytes=max_bytes, counter=counter):
                if not keep(s.label):
                    continue
                img, err = _probe(s.data, max_pixels, s.error) if encoded else _decode(s.data, preprocess, max_pixels, s.error)
                if err:
                    log.warning("skipping corrupt sample key=%s shard=%s: %s", s.key, s.source, err)
                rows.add(s.key, s.source, s.label, img, err)
                if len(rows) >= block_rows:
                    yield rows.block()
        except storage.NotRegularFile as e:  # a FIFO, device or symlink loop among the shards: one error row
            log.warning("cannot read shard %s: %s", url, e.strerror)
            rows.add(url, url, None, None, f"cannot read shard: {e.strerror}")
            yield rows.block(bytes_read=counter.n)
            continue
        yield rows.block(bytes_read=counter.n, bytes_stored=storage.retrying(storage.size, url, what=f"size of {url}"))


# --- Objects under a prefix (offline scoring) -----------------------------------------------

def _hidden(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(".")


def _is_dir(e: os.DirEntry) -> bool:
    """A folder, or a link to one; a symlink loop or a broken link is not (it becomes an error row)."""
    try:
        return e.is_dir()
    except OSError:
        return False


def iter_listing(prefix: str, recursive: bool, page: int = 1000) -> Iterator[tuple[str, bool]]:
    """(uri, is_prefix) under ``prefix``, streamed page by page: memory stays flat however many
    objects there are. Not recursive: the objects directly under it and its sub-prefixes."""
    remote = storage.is_remote(prefix)
    proto = prefix.split("://", 1)[0] if remote else ""
    if not remote:
        if not recursive:
            with os.scandir(prefix) as it:
                for e in it:
                    if not _hidden(e.name):
                        yield e.path, _is_dir(e)
            return
        # Symlinked folders followed, loops and non-regular files listed (their reads give the rows).
        yield from ((p, False) for p in storage.walk_files(prefix))
        return
    fs = storage.cached_filesystem(prefix)
    path = storage.path_of(prefix)
    if proto in ("s3", "s3a") and hasattr(fs, "call_s3"):
        bucket, _, key = path.partition("/")
        key = key.rstrip("/") + "/" if key else ""
        kwargs = {"Bucket": bucket, "Prefix": key, "MaxKeys": page, **({} if recursive else {"Delimiter": "/"})}
        while True:
            resp = storage.retrying(fs.call_s3, "list_objects_v2", what=f"listing {prefix}", **kwargs)
            for c in resp.get("CommonPrefixes", []):
                yield f"{proto}://{bucket}/{c['Prefix']}", True
            for o in resp.get("Contents", []):
                if not o["Key"].endswith("/") and not _hidden(o["Key"]):
                    yield f"{proto}://{bucket}/{o['Key']}", False
            if not resp.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]
    # Other object stores: fsspec's listing (materialised per prefix, not per bucket).
    for p in (fs.find(path) if recursive else fs.ls(path, detail=False)):
        if not _hidden(p):
            yield f"{proto}://{p}", (not recursive and fs.isdir(p))


def expand_listing(batch: dict, block_rows: int) -> Iterator[dict]:
    """Ray Data fn: rows of the top-level listing (objects and sub-prefixes) -> blocks of object
    URIs, listing each sub-prefix recursively in this task: the listing runs in parallel
    across sub-prefixes, and no process ever holds the whole of it."""
    chunk = block_rows
    out: list[str] = []
    for uri, is_prefix in zip(batch["uri"], batch["is_prefix"]):
        found = iter_listing(str(uri), recursive=True) if is_prefix else [(str(uri), False)]
        for u, _ in found:
            out.append(u)
            if len(out) >= chunk:
                yield {"uri": np.array(out, dtype=object)}
                out = []
    if out:
        yield {"uri": np.array(out, dtype=object)}


def object_ext(uri: str) -> str:
    base = posixpath.basename(uri)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def read_objects(batch: dict, preprocess: Preprocess, max_bytes: int, max_pixels: int) -> dict:
    """Ray Data fn: object URIs -> rows decoded by the checkpoint's ``preprocess``. Each object is
    read once, at most max_bytes + 1 bytes of it, through one cached client per worker, with
    retries on transient errors; any failure is an error row."""
    rows = _Rows(preprocess.image_size)
    for uri in batch["uri"]:
        uri, nbytes = str(uri), 0
        img, err = None, None
        ext = object_ext(uri)
        try:
            if ext not in IMAGE_EXTS:
                raise BadImage(f"not an image object (extension {ext or 'none'!r}; expected one of {list(IMAGE_EXTS)})")
            data = storage.retrying(storage.read_capped, uri, max_bytes, what=f"read of {uri}")
            nbytes = len(data)
            img = preprocess(data, max_pixels)
        except (BadImage, storage.TooLarge) as e:
            err = str(e)
        except storage.NotRegularFile as e:  # a FIFO, device, socket or symlink loop: never opened for reading
            err = f"cannot read: {e.strerror}"
        except Exception as e:  # storage errors that survived the retries: permission, vanished object, ...
            err = f"could not read object: {type(e).__name__}: {e}"
        if err:
            log.warning("cannot score %s: %s", uri, err)
        rows.add(uri, uri, None, img, err, nbytes)
    return rows.block()
