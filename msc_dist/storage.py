"""Local folders and s3:// through one fsspec interface.

The S3 endpoint comes from ``MSC_S3_ENDPOINT_URL`` (or the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``) so that the same commands run against AWS, MinIO, or a loopback test server.
Credentials follow the usual boto chain (env, profile, instance role)."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import uuid

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


def open_file(url: str, mode: str = "rb"):
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
        with open(url, "rb") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"object is larger than the limit of {max_bytes} bytes")
    return data


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TooLarge)


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
