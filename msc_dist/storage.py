"""Local folders and s3:// through one fsspec interface.

The S3 endpoint comes from ``MSC_S3_ENDPOINT_URL`` (or the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``) so that the same commands run against AWS, MinIO, or a loopback test server.
Credentials follow the usual boto chain (env, profile, instance role)."""

from __future__ import annotations

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


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem or None, path) for Ray Train's RunConfig(storage_filesystem=...)."""
    if not is_remote(url):
        return None, os.path.abspath(url)
    import pyarrow.fs as pafs

    fs = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), strip_protocol(url)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
