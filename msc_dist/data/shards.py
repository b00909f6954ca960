"""WebDataset shard I/O: ``KEY.jpg|png|webp`` (+ optional ``KEY.cls`` and ``KEY.mask.png``) inside tar files.

``KEY.mask.png`` is the sample's pixel mask (white = defect; black = normal), the size of its
image. Only readers that ask for masks (``iter_samples(..., masks=True)``) read that member; the
others skip it unread, as any other member that is neither an image nor a label.

A shard folder may hold ``shards.json`` (written by our writers): per-shard sample counts and
per-label counts, so that the driver can plan an exact split without reading the data. Shards
without one are scanned once (headers and labels only, no image decode).

Everything goes through fsspec (``tarfile`` in stream mode over a file object): never a shell
pipe built from a URL."""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from msc_dist import storage

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MASK_EXT = "mask.png"  # KEY.mask.png: the sample's pixel mask
MANIFEST = "shards.json"
FORMAT = "msc-shards/1"


class DataError(ValueError):
    """The data cannot be used as given; raised on the driver before any worker starts."""


@dataclass
class ShardInfo:
    url: str
    count: int | None  # None: not known without reading the shard (no shards.json, not scanned)
    # label -> count; None key (str "null" in JSON) for samples without a .cls member.
    labels: dict[int | None, int] = field(default_factory=dict)
    masks: int | None = 0  # samples with a KEY.mask.png member (None: not known, as for count)

    def count_where(self, keep) -> int | None:
        if self.count is None:
            return None
        return sum(n for lab, n in self.labels.items() if keep(lab))


@dataclass
class DatasetInfo:
    spec: str
    shards: list[ShardInfo]
    classes: list[str] | None = None

    @property
    def count(self) -> int | None:
        if any(s.count is None for s in self.shards):
            return None
        return sum(s.count for s in self.shards)

    @property
    def mask_count(self) -> int | None:
        """Samples that carry a mask (None: not known without reading the shards)."""
        if any(s.masks is None for s in self.shards):
            return None
        return sum(s.masks for s in self.shards)

    def label_counts(self) -> dict[int | None, int]:
        out: dict[int | None, int] = {}
        for s in self.shards:
            for k, v in s.labels.items():
                out[k] = out.get(k, 0) + v
        return out


@dataclass
class Sample:
    key: str
    data: bytes | None  # encoded image bytes
    ext: str | None
    label: int | None
    source: str  # shard URL
    error: str | None = None  # why ``data`` is None, where known (e.g. a member above the size limit)
    mask: bytes | None = None  # the KEY.mask.png bytes, read only by readers that ask for masks
    has_mask: bool = False  # the sample has a KEY.mask.png member (read or not)


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything up to the first dot of the basename.
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower()


# Tar members above this size are not read (an error sample instead): a shard is untrusted input.
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024


class ByteCounter:
    """Bytes a reader pulled from storage (retries included), for the jobs' read-amplification figure."""

    def __init__(self) -> None:
        self.n = 0


class _Counting:
    def __init__(self, f, counter: ByteCounter):
        self.f, self.counter = f, counter

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.counter.n += len(b)
        return b


def _iter_tar(url: str, max_member_bytes: int, counter: ByteCounter | None, masks: bool) -> Iterator[Sample]:
    with storage.open_file(url, "rb") as raw:
        f = _Counting(raw, counter) if counter is not None else raw
        with tarfile.open(fileobj=f, mode="r|") as tar:
            cur: Sample | None = None
            for m in tar:
                if not m.isfile():
                    continue
                key, e = _split_key(m.name)
                if cur is None or key != cur.key:
                    if cur is not None:
                        yield cur
                    cur = Sample(key, None, None, None, url)
                if e == MASK_EXT:
                    cur.has_mask = True
                    if not masks:
                        continue  # readers that do not use masks skip them unread
                    if m.size > max_member_bytes:
                        log.warning("%s: key %s: mask member is %d bytes, above the limit of %d; not read", url, key,
                                    m.size, max_member_bytes)
                        continue
                    cur.mask = tar.extractfile(m).read()
                    continue
                if e not in IMAGE_EXTS and e != "cls":
                    continue  # other members are skipped unread (the stream moves past them)
                if m.size > max_member_bytes:
                    cur.error = f"tar member {m.name!r} is {m.size} bytes, above the limit of {max_member_bytes}"
                    continue
                data = tar.extractfile(m).read()
                if e in IMAGE_EXTS:
                    cur.data, cur.ext = data, e
                else:
                    try:
                        cur.label = int(data.strip())
                    except ValueError:
                        log.warning("%s: key %s has a non-integer .cls %r; treated as unlabelled", url, key, data[:20])
            if cur is not None:
                yield cur


def iter_samples(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, counter: ByteCounter | None = None,
                 attempts: int = 4, masks: bool = False) -> Iterator[Sample]:
    """Stream one shard once, grouping consecutive members by key. Members that are neither an
    image nor a label are skipped unread; a sample with no image member (or one above
    ``max_member_bytes``) yields data=None, with ``error`` saying why where there is a reason.
    ``masks``: also read each ``KEY.mask.png`` into ``Sample.mask`` (else it is skipped unread;
    ``has_mask`` says it is there either way).

    A transient storage error (dropped connection, throttling, 5xx) reopens the shard after a
    back-off and skips the samples already yielded; other errors raise at once."""
    done, attempt = 0, 0
    while True:
        try:
            for i, s in enumerate(_iter_tar(url, max_member_bytes, counter, masks)):
                if i >= done:
                    done += 1
                    yield s
            return
        except Exception as e:
            attempt += 1
            if attempt >= attempts or not storage.is_transient(e):
                raise
            wait = storage.backoff_s(attempt)
            log.warning("%s: %s: %s after %d samples; reopening in %.1fs (retry %d/%d)", url, type(e).__name__, e,
                        done, wait, attempt, attempts - 1)
            time.sleep(wait)


def scan_shard(url: str) -> ShardInfo:
    """Count samples, labels and masks by reading the tar stream (no decode; masks skipped unread)."""
    labels: dict[int | None, int] = {}
    n = n_masks = 0
    try:
        for s in iter_samples(url):
            n += 1
            n_masks += s.has_mask
            labels[s.label] = labels.get(s.label, 0) + 1
    except storage.NotRegularFile as e:
        raise DataError(f"shard {url!r}: {e.strerror}") from None
    return ShardInfo(url, n, labels, n_masks)


def expand(spec: str) -> list[str]:
    """A folder/prefix (its *.tar, sorted), a brace pattern (``shard-{000..009}.tar``), a glob,
    or a single .tar; local or s3://. Several specs may be joined with '::'."""
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if "{" in part:
            import braceexpand

            urls.extend(braceexpand.braceexpand(part))
            continue
        fs = storage.filesystem(part)
        proto = part.split("://", 1)[0] + "://" if storage.is_remote(part) else ""
        path = storage.strip_protocol(part) if proto else part
        if any(c in path for c in "*?["):
            urls.extend(proto + p for p in sorted(fs.glob(path)))
        elif path.endswith(".tar"):
            urls.append(part)
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(".tar"))
            urls.extend(proto + p if proto else p for p in found)
        elif not fs.exists(path):
            raise DataError(f"data {part!r} does not exist (expected a folder of .tar shards, a brace pattern, or a .tar)")
    return urls


def _label_key(k: str) -> int | None:
    return None if k == "null" else int(k)


def _read_manifest(folder: str) -> dict | None:
    url = storage.join(folder, MANIFEST)
    if not storage.exists(url):
        return None
    return json.loads(storage.read_bytes(url))


def describe(spec: str, scan_workers: int = 8, scan: bool = True) -> DatasetInfo:
    """Shard list with counts: from ``shards.json`` where present, else by scanning every shard
    (``scan=False``: counts stay unknown, for jobs that read each shard once anyway)."""
    if spec is None or not str(spec).strip():
        raise DataError("no data given: pass --data (a folder of WebDataset .tar shards, a brace pattern, or s3://...)")
    is_folder = "{" not in spec and "::" not in spec and not spec.endswith(".tar") and not any(c in spec for c in "*?[")
    if is_folder and storage.exists(spec):
        man = _read_manifest(spec)
        if man is not None:
            shards = [
                ShardInfo(storage.join(spec, storage.safe_name(s["name"], MANIFEST, DataError)), int(s["count"]),
                          {_label_key(k): int(v) for k, v in s["labels"].items()},
                          int(s.get("masks", 0)))  # manifests written before masks: none
                for s in man["shards"]
            ]
            return DatasetInfo(spec, shards, man.get("classes"))
    urls = expand(spec)
    if not urls:
        raise DataError(f"data {spec!r} holds no .tar shards")
    if not scan:
        return DatasetInfo(spec, [ShardInfo(u, None, {}, None) for u in urls], None)
    log.info("no %s beside %s: scanning %d shard(s) for counts", MANIFEST, spec, len(urls))
    from msc_dist.progress import bar

    with ThreadPoolExecutor(max_workers=min(scan_workers, len(urls))) as ex:
        shards = list(bar(ex.map(scan_shard, urls), total=len(urls), desc="scanning shards", unit="shard"))
    return DatasetInfo(spec, shards, None)


class ShardWriter:
    """Writes numbered shards of at most ``per_shard`` samples into a folder or s3:// prefix,
    then ``shards.json`` last, so a reader that finds the manifest finds every shard whole."""

    def __init__(self, out: str, per_shard: int = 1000, classes: list[str] | None = None, prefix: str = "shard"):
        self.out, self.per_shard, self.classes, self.prefix = out, per_shard, classes, prefix
        self.shards: list[dict] = []
        self._buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._n = 0
        self._labels: dict[str, int] = {}
        self._masks = 0
        if not storage.is_remote(out):
            import os

            os.makedirs(out, exist_ok=True)

    def _add(self, tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, ext: str, label: int | None = None, mask: bytes | None = None) -> None:
        """One sample: its encoded image, label and, where given, its mask (PNG bytes, white =
        defect, the image's size), written as ``KEY.mask.png``."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w")
        self._add(self._tar, f"{key}.{ext}", image)
        if label is not None:
            self._add(self._tar, f"{key}.cls", str(int(label)).encode())
        if mask is not None:
            self._add(self._tar, f"{key}.{MASK_EXT}", mask)
            self._masks += 1
        lk = "null" if label is None else str(int(label))
        self._labels[lk] = self._labels.get(lk, 0) + 1
        self._n += 1
        if self._n >= self.per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._tar is None or self._n == 0:
            return
        self._tar.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        storage.write_bytes_atomic(storage.join(self.out, name), self._buf.getvalue())
        self.shards.append({"name": name, "count": self._n, "labels": self._labels, "masks": self._masks})
        self._tar, self._buf, self._n, self._labels, self._masks = None, None, 0, {}, 0

    def close(self) -> DatasetInfo:
        self._flush()
        man = {"format": FORMAT, "classes": self.classes, "shards": self.shards}
        storage.write_bytes_atomic(storage.join(self.out, MANIFEST), json.dumps(man, indent=1).encode())
        return describe(self.out)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
