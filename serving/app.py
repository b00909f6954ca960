"""Ray Serve scoring app: a FastAPI gateway (validation, auth, decoding) in front of an
autoscaled model deployment that batches single images across requests with ``@serve.batch``.

    POST /v1/score   one image body (image/jpeg|png|webp) or multipart/form-data with several
    GET  /v1/model   model id, backbone, image size, index size, threshold
    GET  /healthz
    GET  /docs, /openapi.json

Auth: ``Authorization: Bearer <key>``; a replica without a key refuses to start unless
``allow_anonymous: true`` is set. Bad input gets a 4xx JSON error ``{"error": {"status",
"message"}}``; overload and failures that a retry can cure get 503 with Retry-After, never a 500;
decoding (JPEG, PNG, WebP only) runs in a thread pool under the same deadline as the model call."""

# No `from __future__ import annotations` here: FastAPI must see real `Request` annotations.
import asyncio
import contextlib
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from msc_dist.config import ConfigError
from msc_dist.data.decode import (DEFAULT_FORMATS, BadImage, TooManyPixels, UnsupportedFormat, open_image, resize_to,
                                  to_array)

log = logging.getLogger("ray.serve")  # Serve's logger: lines reach the replica logs

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")

DEFAULTS = {
    "checkpoint": None,  # None: the checkpoint recorded in the index manifest (the one that built the index)
    "index": "~/msc_runs/msc/serving",  # the embedding job's --out
    "device": "auto",  # auto = cuda when the replica has a GPU
    "max_batch_size": 32,
    "batch_wait_timeout_s": 0.005,
    "max_body_bytes": 20 * 1024 * 1024,
    "max_files": 16,
    "max_pixels": 40_000_000,  # per image
    "max_request_pixels": 80_000_000,  # all images of one request together
    "max_inflight_bytes": 256 * 1024 * 1024,  # request bodies held at once by one Gateway replica
    "decode_threads": 4,  # per Gateway replica; decoding never runs on the event loop
    "formats": list(DEFAULT_FORMATS),  # Pillow format ids that reach a decoder
    "request_timeout_s": 20.0,  # decoding + scoring
    "retry_after_s": 1,
    "api_key_env": "MSC_API_KEY",
    "api_key_file": None,
    "allow_anonymous": False,  # true: serve without a key (local use only); never implied by a missing key
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _expand(p: str) -> str:
    return p if "://" in p else os.path.expanduser(p)


def _true(v) -> bool:
    # `serve run ... allow_anonymous=true` passes the string.
    return v is True or str(v).strip().lower() == "true"


def load_api_key(s: dict) -> tuple[str | None, str]:
    """(the API key, or None for anonymous access; the auth mode in words). Fails closed: a named
    key file that is missing or empty, or no key at all without allow_anonymous, is an error."""
    path = s.get("api_key_file")
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise ConfigError(f"api_key_file {path!r} does not exist")
        with open(path) as f:
            key = f.read().strip()
        if not key:
            raise ConfigError(f"api_key_file {path!r} is empty")
        return key, f"API key required (from api_key_file {path})"
    env = s.get("api_key_env") or ""
    key = os.environ.get(env, "").strip() if env else ""
    if key:
        return key, f"API key required (from ${env})"
    if _true(s.get("allow_anonymous")):
        return None, "ANONYMOUS: allow_anonymous is true, every caller is served without a key"
    raise ConfigError(f"no API key: set ${env or 'MSC_API_KEY'} (api_key_env) or api_key_file, "
                      "or set allow_anonymous: true to serve without auth")


class InflightBytes:
    """Request-body bytes one replica holds at once; bytes beyond ``cap`` get 503 + Retry-After."""

    def __init__(self, cap: int, retry_after_s):
        self.cap, self.used, self.retry = int(cap), 0, {"Retry-After": str(retry_after_s)}

    @contextlib.contextmanager
    def request(self):
        """A ``take(n)`` for one request; everything it took is released when the request ends."""
        held = 0

        def take(n: int) -> None:
            nonlocal held
            if self.used + n > self.cap:
                raise ApiError(503, f"busy: {self.used} bytes of request bodies are in flight on this replica "
                                    f"(limit {self.cap}), retry later", self.retry)
            self.used += n
            held += n

        try:
            yield take
        finally:
            self.used -= held


def image_error(name: str, e: BadImage) -> ApiError:
    status = 415 if isinstance(e, UnsupportedFormat) else 413 if isinstance(e, TooManyPixels) else 422
    return ApiError(status, f"{name}: {e}")


def decode_request(files: list[tuple[str, bytes]], size: int, max_pixels: int, max_request_pixels: int,
                   formats, resize_mode: str = "squash") -> list[np.ndarray]:
    """Every header first (format and pixel limits, no pixel data decoded), then the pixels (made
    ``size`` square by the model's ``resize_mode``): a request over its pixel budget costs only
    header parsing. Runs in the decode thread pool."""
    opened, total = [], 0
    for name, data in files:
        try:
            img = open_image(data, max_pixels, formats)
        except BadImage as e:
            raise image_error(name, e) from None
        total += img.size[0] * img.size[1]
        if total > max_request_pixels:
            raise ApiError(413, f"the images of this request hold more than {max_request_pixels} pixels together "
                                "(max_request_pixels): send fewer or smaller images per request")
        opened.append((name, img))
    out = []
    for name, img in opened:
        try:
            out.append(to_array(img, size, resize_mode))
        except BadImage as e:
            raise image_error(name, e) from None
    return out


@serve.deployment(name="Model", max_ongoing_requests=64, max_queued_requests=256)
class Model:
    """Holds a Scorer (model + index). A new checkpoint or index rolls in through
    ``user_config``: the new Scorer is loaded beside the old one, then swapped in one assignment,
    so requests in flight finish on the old one and none is dropped."""

    def __init__(self, **settings):
        # Nothing is loaded here: build_app always gives the deployment a user_config, which Serve
        # applies (reconfigure) before the replica takes requests. Loading here too would load
        # the bound (default) index first, and fail when only the user_config names a real one.
        self.settings = {**DEFAULTS, **settings}
        self.scorer = None

    def _apply(self, s: dict) -> None:
        import torch

        from msc_dist.scorer import Scorer

        want = (_expand(s["checkpoint"]) if s.get("checkpoint") else None, _expand(s["index"]))
        if self.scorer is None or want != self._loaded:
            dev = s.get("device", "auto")
            if dev == "auto":
                dev = "cuda" if torch.cuda.is_available() else "cpu"
            # No checkpoint: the one the index manifest records. Scorer checks the index's
            # model_id against the checkpoint: a mismatch stops the replica from starting.
            new = Scorer(want[0], want[1], device=dev, use_gpu_index=dev == "cuda")
            self.scorer, self._loaded = new, want
            log.info("serving model %s with %d indexed vectors", new.model_id[:12], new.index.count)
        self.score_batch.set_max_batch_size(int(s["max_batch_size"]))
        self.score_batch.set_batch_wait_timeout_s(float(s["batch_wait_timeout_s"]))

    def reconfigure(self, user_config: dict) -> None:
        self.settings = {**self.settings, **(user_config or {})}
        self._apply(self.settings)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score_batch(self, images: list[np.ndarray]) -> list[dict]:
        import torch

        scorer = self.scorer  # one reference for the whole batch, even if a roll swaps it
        # Per image: during a roll that changes image_size, one batch can hold both sizes.
        x = torch.from_numpy(resize_to(images, scorer.image_size)).permute(0, 3, 1, 2)
        return [r.to_dict() for r in scorer.score_embeddings(scorer.embed(x))]

    async def score(self, images: list[np.ndarray]) -> list[dict]:
        return list(await asyncio.gather(*(self.score_batch(im) for im in images)))

    def info(self) -> dict:
        return self.scorer.info()

    def check_health(self) -> None:
        if self.scorer is None:
            raise RuntimeError("no model loaded: the Model deployment was started without a user_config")


api = FastAPI(title="msc-dist anomaly scoring", version="1")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse({"error": {"status": exc.status, "message": exc.message}}, status_code=exc.status, headers=exc.headers)


@serve.deployment(name="Gateway", max_ongoing_requests=256, max_queued_requests=1024)
@serve.ingress(api)
class Gateway:
    def __init__(self, model, **settings):
        self.model = model
        self.s = {**DEFAULTS, **settings}
        self.api_key, mode = load_api_key(self.s)  # raises: the replica does not start
        (log.warning if self.api_key is None else log.info)("msc Gateway auth: %s", mode)
        self.formats = tuple(str(f).upper() for f in self.s["formats"])
        self.inflight = InflightBytes(self.s["max_inflight_bytes"], self.s["retry_after_s"])
        self.pool = ThreadPoolExecutor(int(self.s["decode_threads"]), thread_name_prefix="msc-decode")
        self._view = None  # (fetched at, (image size, resize mode)) of the live model

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        # compare_digest: constant time in the length of the key.
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})

    async def _guarded(self, coro):
        """One deadline (request_timeout_s) over decoding and the model call; every failure that is
        not the caller's is a 503 with Retry-After (retryable), never a 500."""
        retry = {"Retry-After": str(self.s["retry_after_s"])}
        try:
            return await asyncio.wait_for(coro, self.s["request_timeout_s"])
        except ApiError:
            raise
        except BackPressureError:
            raise ApiError(503, "overloaded: the scoring queue is full, retry later", retry) from None
        except asyncio.TimeoutError:
            raise ApiError(503, f"timed out after {self.s['request_timeout_s']}s, retry later", retry) from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
            # A model replica died or is being replaced mid-request; the next try reaches a live one.
            raise ApiError(503, "a model replica became unavailable, retry later", retry) from None
        except Exception as e:
            log.exception("request failed")
            raise ApiError(503, f"scoring failed ({type(e).__name__}), retry later", retry) from None

    async def _model_view(self) -> tuple[int, str]:
        """(image size, resize mode) of the live model: the checkpoint's, refreshed every 10 s."""
        if self._view is None or time.monotonic() - self._view[0] > 10:
            info = await self.model.info.remote()
            self._view = (time.monotonic(), (int(info["image_size"]), str(info.get("resize_mode", "squash"))))
        return self._view[1]

    async def _read(self, request: Request, take) -> bytes:
        limit = self.s["max_body_bytes"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"body is {declared} bytes, above the limit of {limit}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ApiError(413, f"body is above the limit of {limit} bytes")
            take(len(chunk))  # 503 when this replica already holds max_inflight_bytes
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise ApiError(400, f"empty body: send an image ({', '.join(IMAGE_TYPES)}) or multipart/form-data")
        return body

    async def _files(self, request: Request, ctype: str, body: bytes) -> list[tuple[str, bytes]]:
        if ctype in IMAGE_TYPES:
            return [("body", body)]
        if ctype != "multipart/form-data":
            raise ApiError(415, f"content type {ctype or 'missing'!r} is not accepted; use one of "
                                f"{', '.join(IMAGE_TYPES)} or multipart/form-data")
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def _stream():
            yield body

        max_files = int(self.s["max_files"])
        try:
            form = await MultiPartParser(request.headers, _stream(), max_files=max_files, max_fields=max_files,
                                         max_part_size=int(self.s["max_body_bytes"])).parse()
        except MultiPartException as e:
            if "Too many files" in str(e):
                raise ApiError(413, f"too many files: at most {max_files} per request") from None
            raise ApiError(400, f"malformed multipart body: {e}") from None
        files = [(f.filename or k, await f.read()) for k, f in form.multi_items() if isinstance(f, UploadFile)]
        if not files:
            raise ApiError(400, "multipart body has no files: send the images as file parts")
        return files

    async def _decode_and_score(self, files: list[tuple[str, bytes]]) -> list[dict]:
        size, mode = await self._model_view()
        arrays = await asyncio.get_running_loop().run_in_executor(
            self.pool, decode_request, files, size, int(self.s["max_pixels"]), int(self.s["max_request_pixels"]),
            self.formats, mode)
        return await self.model.score.remote(arrays)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model_info(self, request: Request):
        self._auth(request)
        return await self._guarded(self.model.info.remote())

    @api.post("/v1/score")
    async def score(self, request: Request):
        self._auth(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in IMAGE_TYPES and ctype != "multipart/form-data":
            raise ApiError(415, f"content type {ctype!r} is not accepted; use one of {', '.join(IMAGE_TYPES)} or multipart/form-data")
        with self.inflight.request() as take:
            body = await self._read(request, take)
            files = await self._files(request, ctype, body)
            return await self._guarded(self._decode_and_score(files))


def build_app(args: dict | None = None):
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` override DEFAULTS
    (``serve run serving.app:build_app allow_anonymous=true`` for an open local endpoint).
    ``index_shards: N`` > 0 builds the sharded layout of serving/sharded.py instead (the index
    spread over N IndexShard deployments); 0, the default, one Model deployment with the index.
    From Python, ``model_options`` / ``gateway_options`` set deployment options (the YAML's
    ``deployments:`` section does the same for ``serve deploy``)."""
    args = {**DEFAULTS, **(args or {})}
    if int(args.get("index_shards") or 0) > 0:  # the index spread over IndexShard deployments
        from serving.sharded import build_sharded_app

        return build_sharded_app(args)
    args.pop("index_shards", None)
    model_opts, gateway_opts = args.pop("model_options", None) or {}, args.pop("gateway_options", None) or {}
    model_keys = ("checkpoint", "index", "device", "max_batch_size", "batch_wait_timeout_s")
    model_args = {k: args[k] for k in model_keys}
    # The Model loads in reconfigure: these args are its user_config unless the options (or the
    # YAML's deployments section) give one, which the bound args then complete.
    model = Model.options(**{"user_config": model_args, **model_opts}).bind(**model_args)
    return Gateway.options(**gateway_opts).bind(model, **{k: v for k, v in args.items() if k not in model_keys})


app = build_app
