"""Local folders and s3:// through one fsspec interface.

The S3 endpoint comes from ``MSC_S3_ENDPOINT_URL`` (or the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``) so that the same commands run against AWS, MinIO, or a loopback test server.
Credentials follow the usual boto chain (env, profile, instance role)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import stat
import uuid
from typing import Iterator

import fsspec

ENDPOINT_ENV = ("MSC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# What a driver passes on to the workers of a cluster it joins: where the storage is, never
# credentials (a runtime env is visible in the dashboard). Workers take credentials from the
# cluster's own chain (instance role, IRSA, the nodes' environment) or the job's runtime env.
FORWARDED_ENV = ENDPOINT_ENV + ("AWS_DEFAULT_REGION", "AWS_REGION")


def s3_endpoint() -> str | None:
    for k in ENDPOINT_ENV:
        if os.environ.get(k):
            return os.environ[k]
    return None


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        kwargs: dict = {}
        ep = s3_endpoint()
        if ep:
            kwargs["client_kwargs"] = {"endpoint_url": ep}
        # Cached instances would keep a dead loopback endpoint across tests.
        return fsspec.filesystem("s3", skip_instance_cache=True, **kwargs)
    return fsspec.filesystem(protocol)


def strip_protocol(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


class NotRegularFile(OSError):
    """A local path that is not a regular file (a FIFO, device, socket or folder) or a symlink
    loop: never read. ``strerror`` says which, for error rows."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: str):
    """A local file opened for binary reading, only if it is a regular file (symlinks followed),
    and never blocking: the open itself is non-blocking (a FIFO without a writer would otherwise
    wait forever), the type is checked on the open descriptor (no race with a swap of the path),
    then reads block as usual. Else NotRegularFile, or FileNotFoundError / PermissionError."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a symlink loop (too many levels of symbolic links)", path) from None
        if e.errno == errno.ENXIO:  # open() of a socket
            raise NotRegularFile(errno.ENXIO, "not a regular file (a socket)", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({kind}); only regular files are read", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def walk_files(root: str, hidden: bool = False) -> Iterator[str]:
    """Every entry under a local folder that is not a folder, recursively (each folder's own
    entries by name, then its sub-folders by name, as ``os.walk`` top-down) (names
    starting with '.' skipped unless ``hidden``): files, and also FIFOs, devices, broken links and
    symlink loops, so that their readers turn each into an error row instead of dropping it.
    Symlinked folders are followed; one that leads back to a folder above it, or above ``root``
    (a loop), is yielded as an entry instead of followed, so the walk always ends."""

    def key(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def walk(folder: str, above: frozenset) -> Iterator[str]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            yield folder  # unreadable folder: its reader says why
            return
        folders = []
        for e in entries:  # this folder's entries first, then its sub-folders (as os.walk)
            if not hidden and e.name.startswith("."):
                continue
            try:
                st = os.stat(e.path)  # follows symlinks; ELOOP for a loop of links
            except OSError:
                yield e.path
                continue
            if not stat.S_ISDIR(st.st_mode) or key(st) in above:
                yield e.path  # a link back to a folder above is a loop: one error row
            else:
                folders.append((e.path, key(st)))
        for path, k in folders:
            yield from walk(path, above | {k})

    # The folders above ``root`` count too: a link up to any of them is a loop, wherever the walk began.
    up, chain = os.path.realpath(root), set()
    while True:
        chain.add(key(os.stat(up)))
        if os.path.dirname(up) == up:
            break
        up = os.path.dirname(up)
    yield from walk(root, frozenset(chain))


def open_file(url: str, mode: str = "rb"):
    """A file object; local reads open regular files only (``open_regular``)."""
    if mode == "rb" and not is_remote(url):
        return open_regular(url)
    fs = filesystem(url)
    return fs.open(strip_protocol(url) if is_remote(url) else url, mode)


def exists(url: str) -> bool:
    fs = filesystem(url)
    return fs.exists(strip_protocol(url) if is_remote(url) else url)


def read_bytes(url: str) -> bytes:
    with open_file(url, "rb") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write then rename, so readers never see a partial file. (S3 PUTs are atomic already.)"""
    if is_remote(url):
        with open_file(url, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    tmp = f"{url}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, url)


def sha256(data: bytes) -> str:
    """Hex digest: what manifests record for every file they list."""
    return hashlib.sha256(data).hexdigest()


def write_table(url: str, table) -> str:
    """A pyarrow table as one Parquet file, written atomically; returns the file's sha256."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    write_bytes_atomic(url, data)
    return sha256(data)


def safe_name(name: str, where: str, error: type[ValueError] = ValueError) -> str:
    """A file name from a manifest, relative to its folder: no absolute paths, no '..'. Raises
    ``error`` (the caller's own error type) naming ``where`` the name came from."""
    parts = str(name).replace("\\", "/").split("/")
    if not name or str(name).startswith("/") or "://" in str(name) or any(p in ("", ".", "..") for p in parts):
        raise error(f"{where}: refusing file name {name!r} (must be relative, without '..')")
    return str(name)


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem or None, path) for Ray Train's RunConfig(storage_filesystem=...)."""
    if not is_remote(url):
        return None, os.path.abspath(url)
    import pyarrow.fs as pafs

    fs = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), strip_protocol(url)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


# --- Bounded, retried reads for the batch jobs ------------------------------------------------

_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}


def cached_filesystem(url: str) -> fsspec.AbstractFileSystem:
    """One filesystem per (protocol, endpoint) and process: a worker that reads thousands of
    objects reuses its connection pool. S3 clients retry throttling and 5xx with adaptive backoff.
    Keyed by endpoint, so a test server that moved is never reached through a stale client."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    key = (protocol, s3_endpoint() if protocol in ("s3", "s3a") else None, os.getpid())
    fs = _FS_CACHE.get(key)
    if fs is None:
        if protocol in ("s3", "s3a"):
            kwargs: dict = {"config_kwargs": {"retries": {"max_attempts": 8, "mode": "adaptive"}}}
            if key[1]:
                kwargs["client_kwargs"] = {"endpoint_url": key[1]}
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **kwargs)
        else:
            fs = fsspec.filesystem(protocol)
        _FS_CACHE[key] = fs
    return fs


def path_of(url: str) -> str:
    return strip_protocol(url) if is_remote(url) else url


class TooLarge(ValueError):
    """An object or member above its byte limit; nothing beyond the limit was read."""


def read_capped(url: str, max_bytes: int) -> bytes:
    """The whole object if it holds at most ``max_bytes``; reads at most max_bytes + 1 bytes
    (one ranged GET on S3, no separate HEAD), so an oversized object costs no more than the limit."""
    fs = cached_filesystem(url)
    if is_remote(url):
        data = fs.cat_file(path_of(url), start=0, end=max_bytes + 1)
    else:
        with open_regular(url) as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"object is larger than the limit of {max_bytes} bytes")
    return data


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, NotRegularFile, TooLarge)


def is_transient(e: BaseException) -> bool:
    """Worth retrying: connection drops, time-outs, throttling and 5xx answers. A missing or
    forbidden object, or bad data, is not."""
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    name = type(e).__name__
    if name in ("ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                "ServerDisconnectedError", "ClientPayloadError", "ResponseStreamingError", "IncompleteReadError"):
        return True
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""
    return code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "503", "500")


def backoff_s(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential back-off with full jitter (attempt = 1, 2, ...)."""
    import random

    return random.uniform(0, min(cap, base * 2 ** attempt))


def retrying(fn, *args, attempts: int = 4, what: str = "read", **kwargs):
    """``fn(*args, **kwargs)``, retried on transient storage errors with back-off."""
    import logging
    import time

    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            wait = backoff_s(attempt)
            logging.getLogger(__name__).warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__,
                                                e, attempt, attempts - 1, wait)
            time.sleep(wait)


def size(url: str) -> int:
    return int(cached_filesystem(url).size(path_of(url)))


def expand(path: str) -> str:
    """A local path with ``~`` expanded; URLs as given."""
    return path if "://" in path else os.path.expanduser(path)


# --- One-line explanations of storage failures, for the CLI ------------------------------------

_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError")
_AUTH_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
               "AuthorizationHeaderMalformed", "403")


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__  # RayTaskError keeps the worker's as .cause


def explain(e: BaseException) -> str | None:
    """One line for a failure to reach S3 (no or wrong credentials, an endpoint that does not
    answer) saying what to do; None for anything else. The traceback is for --verbose."""
    ep = s3_endpoint() or "the default AWS endpoint"
    for x in _chain(e):
        name = type(x).__name__
        if name == "ProfileNotFound":
            return f"{x}: correct AWS_PROFILE (or unset it) so that S3 ({ep}) gets credentials"
        if name in _CREDENTIALS:
            return (f"S3 ({ep}) has no usable credentials ({name}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "or AWS_PROFILE, or run where an instance role / IRSA provides them")
        code = str(getattr(x, "response", {}).get("Error", {}).get("Code", "")) if hasattr(x, "response") else ""
        if code in _AUTH_CODES:
            return (f"S3 ({ep}) refused the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                    "AWS_PROFILE, and that they may read and write the bucket")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError"):
            url = getattr(x, "kwargs", {}).get("endpoint_url") or ep
            if "://" in url:  # the endpoint, not the object's path on it
                scheme, rest = url.split("://", 1)
                url = f"{scheme}://{rest.split('/', 1)[0]}"
            return (f"S3 endpoint {url} does not answer ({name}): correct MSC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL "
                    "(unset both for AWS itself), or start the storage server")
        if name == "NoSuchBucket" or code == "NoSuchBucket":
            return f"S3 ({ep}): the bucket does not exist ({x}); create it or correct the s3:// URL"
    return None
