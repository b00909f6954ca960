"""The serving app's one typed config: what ``serve run serving/config.yaml`` args, ``build_app``
from Python and ``msc serve`` (flags and ``--config``) all set. ``AppConfig.from_args`` takes the
strings ``serve run ... key=value`` passes, names an unknown key with the valid ones, and checks
every value against its documented range (``RANGES``) at deploy time."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from msc_dist.config import ConfigError, Range, check_ranges, from_dict
from msc_dist.runtime import HELP as RUNTIME_HELP

DEFAULT_FORMATS = ["JPEG", "PNG", "WEBP"]
DEVICES = "auto | cpu | cuda | cuda:N"


@dataclass
class AppConfig:
    index: str = os.path.join("~", "msc_runs", "msc", "serving")
    # Multiplexed serving: every detector of this registry (msc_dist/registry.py) in one app.
    registry: str | None = None
    max_detectors_per_replica: int = 4
    checkpoint: str | None = None
    device: str = "auto"
    runtime: str = "torch"
    # The Model: batching and how it follows the published index versions.
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    index_poll_s: float = 10.0
    keep_versions: int = 2
    # The Gateway: limits on what one request or replica may cost.
    max_body_bytes: int = 20 * 1024 * 1024
    max_files: int = 16
    max_pixels: int = 40_000_000
    max_request_pixels: int = 80_000_000
    max_inflight_bytes: int = 256 * 1024 * 1024
    decode_threads: int = 4
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    request_timeout_s: float = 20.0
    retry_after_s: int = 1
    # Auth: a key is required unless allow_anonymous is true.
    api_key_env: str = "MSC_API_KEY"
    api_key_file: str | None = None
    allow_anonymous: bool = False
    # The sharded layout (serving/sharded.py): 0 = one Model deployment holding the whole index.
    index_shards: int = 0
    shard_timeout_s: float = 5.0
    shard_load_timeout_s: float = 600.0

    # Each numeric key's valid values (msc_dist.config.check_ranges; the README's threat model lists them).
    RANGES: ClassVar[dict[str, Range]] = {
        "max_batch_size": Range(1, 4096),
        "batch_wait_timeout_s": Range(0, 10),
        "index_poll_s": Range(0, 86400),  # 0: never re-read the index pointer
        "keep_versions": Range(1, 16),
        "max_detectors_per_replica": Range(1, 4096),
        "max_body_bytes": Range(1, 1 << 30),
        "max_files": Range(1, 1024),
        "max_pixels": Range(1, 1_000_000_000),
        "max_request_pixels": Range(1, 4_000_000_000),
        "max_inflight_bytes": Range(1, 64 << 30),
        "decode_threads": Range(1, 256),
        "request_timeout_s": Range(0, 3600, lo_open=True),
        "retry_after_s": Range(0, 3600),
        "index_shards": Range(0, 4096),
        "shard_timeout_s": Range(0, 3600, lo_open=True),
        "shard_load_timeout_s": Range(0, 86400, lo_open=True),
    }

    @classmethod
    def from_args(cls, args: dict[str, Any] | None, source: str = "serving args") -> "AppConfig":
        cfg = from_dict(cls, dict(args or {}), source=source)
        cfg.validate()
        return cfg

    def validate(self) -> "AppConfig":
        check_ranges(self)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: unknown device {self.device!r}; valid: {DEVICES}")
        from msc_dist.runtime import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime: unknown runtime {self.runtime!r}; valid: {' | '.join(RUNTIMES)}")
        if not self.formats:
            raise ConfigError(f"formats: at least one format id is needed, e.g. {DEFAULT_FORMATS}")
        self.formats = [str(f).upper() for f in self.formats]
        if self.max_request_pixels < self.max_pixels:
            raise ConfigError(f"max_request_pixels ({self.max_request_pixels}) must be at least max_pixels "
                              f"({self.max_pixels}): a request of one image within max_pixels would be refused")
        if not self.index and not self.registry:
            raise ConfigError("index: required (the embedding job's --out, a folder or s3:// prefix), or a registry")
        if self.registry and self.index_shards:
            raise ConfigError("registry: the sharded layout (index_shards > 0) serves one index; set index_shards 0 "
                              "to serve a registry")
        return self

    def args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



HELP = {
    "index": "index root (the embedding job's --out: serving follows its published versions) or one version "
             "folder (pinned: never rolls); local or s3://",
    "registry": "serve every detector of this registry (folder or s3:// prefix; msc embed --detector publishes "
                "into it) at /v1/detectors/NAME/score, the default one at /v1/score; index is then unused",
    "max_detectors_per_replica": "with a registry: detectors one Model replica holds at once (the least recently "
                                 "used is unloaded)",
    "checkpoint": "checkpoint or run folder; default: the one each index version's manifest records (the one "
                  "that built it)",
    "device": f"{DEVICES} (auto: cuda when the replica has a GPU)",
    "runtime": "what runs the Model's forward: " + RUNTIME_HELP,
    "max_batch_size": "images the Model batches into one forward pass",
    "batch_wait_timeout_s": "how long the Model waits to fill a batch",
    "index_poll_s": "re-read the index pointer this often and roll to a newly published version (0: never)",
    "keep_versions": "versions a Model (or IndexShard) replica holds during a roll (the live one and the ones before)",
    "max_body_bytes": "largest request body (413 above it)",
    "max_files": "most images in one multipart request (413 above it)",
    "max_pixels": "largest image in pixels, from its header, before any decode (413 above it)",
    "max_request_pixels": "all images of one request together, in pixels (413 above it)",
    "max_inflight_bytes": "request bodies one Gateway replica holds at once (503 + Retry-After above it)",
    "decode_threads": "decoding threads per Gateway replica",
    "formats": "image formats (Pillow ids) that reach a decoder; others get 415",
    "request_timeout_s": "deadline for decoding + scoring one request (503 + Retry-After past it)",
    "retry_after_s": "the Retry-After header of 503 answers",
    "api_key_env": "environment variable holding the API key (requests send 'Authorization: Bearer KEY')",
    "api_key_file": "file holding the API key (wins over api_key_env)",
    "allow_anonymous": "serve without any key (local use only); without it and without a key, serving refuses "
                       "to start",
    "index_shards": "0: one Model deployment holding the index; N: the index spread over N IndexShard deployments",
    "shard_timeout_s": "sharded layout: an index shard slower than this fails the batch (503)",
    "shard_load_timeout_s": "sharded layout: how long a new version may take to load on every shard group",
}


def load_api_key(s: AppConfig) -> tuple[str | None, str]:
    """(the API key, or None for anonymous access; the auth mode in words). Fails closed: a named
    key file that is missing or empty, or no key at all without allow_anonymous, is an error."""
    path = s.api_key_file
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise ConfigError(f"api_key_file {path!r} does not exist")
        with open(path) as f:
            key = f.read().strip()
        if not key:
            raise ConfigError(f"api_key_file {path!r} is empty")
        return key, f"API key required (from api_key_file {path})"
    env = s.api_key_env or ""
    key = os.environ.get(env, "").strip() if env else ""
    if key:
        return key, f"API key required (from ${env})"
    if s.allow_anonymous:
        return None, "ANONYMOUS: allow_anonymous is true, every caller is served without a key"
    raise ConfigError(f"no API key: set ${env or 'MSC_API_KEY'} (api_key_env) or api_key_file, "
                      "or set allow_anonymous: true to serve without auth")


@dataclass
class ServeConfig(AppConfig):
    """``msc serve``: the app's config plus where Serve listens and which Ray it joins."""

    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None

    RANGES: ClassVar[dict[str, Range]] = {"port": Range(1, 65535)}

    def validate(self) -> "ServeConfig":
        super().validate()
        return self

    def app_args(self) -> dict[str, Any]:
        """The AppConfig part: what ``build_app`` takes."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AppConfig)}


SERVE_HELP = {
    **HELP,
    "host": "address to listen on: 127.0.0.1 (default) serves this machine only; 0.0.0.0 every interface",
    "port": "HTTP port",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray started here)",
}


def check_startup(cfg: AppConfig, port_of: tuple[str, int] | None = None) -> dict:
    """What a deployment would fail on at start, found before Serve starts, each in one line: the
    API key, the index's live (or pinned) version, the checkpoint it names (every checksum), the
    pair (model id, image size, resize mode), the runtime, enough index shards for ``index_shards``, and the
    address to listen on (``port_of``: (host, port)). Raises ConfigError, IndexMismatch or
    CheckpointError; returns what it found, for the start-up line."""
    _, auth = load_api_key(cfg)  # first: it needs nothing heavy
    from msc_dist.runtime import resolve

    # The runtime: installed, and not a CPU runtime on a GPU device (device auto: the replica decides).
    resolve(cfg.runtime, "cpu" if cfg.device == "auto" else cfg.device)

    if cfg.registry:
        found = _check_registry(cfg, auth)
        if port_of is not None:
            _check_port(*port_of)
        return found

    from msc_dist import checkpoint as ckpt
    from msc_dist.card import preprocess_of
    from msc_dist.index import read_manifest
    from msc_dist.scorer import check_pair, checkpoint_of
    from msc_dist.storage import expand

    man, _folder = read_manifest(expand(cfg.index))
    ck = ckpt.load(ckpt.resolve(checkpoint_of(man, cfg.checkpoint)))
    pre = preprocess_of(ck.config)
    check_pair(man, ck.model_id, pre)
    if cfg.index_shards > len(man.shards):
        raise ConfigError(f"index_shards {cfg.index_shards} is more than the {len(man.shards)} shards of index version "
                          f"{man.version}: rebuild it with --num-shards {cfg.index_shards} or more, or lower index_shards")
    if port_of is not None:
        _check_port(*port_of)
    return {"auth": auth, "version": man.version, "model_id": ck.model_id, "vectors": man.count,
            "preprocess": pre.describe()}


def _check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None


def _check_registry(cfg: AppConfig, auth: str) -> dict:
    """A registry to serve: it exists (its detectors load on first use, each checked then)."""
    from msc_dist import registry, storage

    reg = storage.expand(cfg.registry)
    if not storage.exists(reg):
        raise ConfigError(f"registry {cfg.registry!r} does not exist: publish a detector into it with "
                          "msc embed --detector NAME --registry ...")
    return {"auth": auth, "registry": cfg.registry, "detectors": registry.names(reg), "default": registry.get_default(reg)}
