"""The serving app's front: a FastAPI Gateway (auth, validation, limits, decoding) in front of
the Model deployment (serving/model.py), in both layouts.

    POST /v1/score   one image body (image/jpeg|png|webp) or multipart/form-data with several;
                     ?maps=1 adds each image's anomaly map, boxes and area (a version with a patch bank)
    GET  /v1/model   model id, backbone, preprocessing, index size and version, threshold, and the
                     share of recent images over the threshold (serving/metrics.py)
    GET  /healthz

With a ``registry`` (multiplexed serving, msc_dist/registry.py), every detector of it:

    POST /v1/detectors/{name}/score   as /v1/score, scored by detector ``name`` (404: no such detector)
    GET  /v1/detectors                the live detectors and the default one
    GET  /v1/detectors/{name}         one detector: live version, index size, threshold, model
    POST /v1/score                    the registry's default detector (none set: 404)

The Gateway routes each request to a Model replica that holds its detector (Serve's
``multiplexed_model_id``); a replica loads one on first use within the request's deadline (past
it: 503 + Retry-After, and the load goes on for the next request).
    GET  /docs, /openapi.json

Auth: ``Authorization: Bearer <key>``; a replica without a key refuses to start unless
``allow_anonymous: true`` is set. Bad input gets a 4xx JSON error ``{"error": {"status",
"message"}}``; overload and failures that a retry can cure get 503 with Retry-After, never a 500.
Decoding (JPEG, PNG, WebP only) runs in a thread pool under the same deadline as the model call,
by the model card of the live index version: the Gateway asks the Model for it (``card``) at
most once per ``index_poll_s``, and sends each request's version with its pixels."""

# No `from __future__ import annotations` here: FastAPI must see real `Request` annotations.
import asyncio
import contextlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from msc_dist.data.decode import BadImage, Preprocess, TooManyPixels, UnsupportedFormat
from msc_dist.registry import UnknownDetector
from serving.errors import Unavailable, why
from serving.metrics import DEFAULT, DetectorMetrics
from serving.settings import AppConfig, load_api_key

log = logging.getLogger("ray.serve")  # Serve's logger: lines reach the replica logs

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


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


def maps_flag(value: str | None) -> bool:
    """The ``maps`` query parameter: absent, 0 or false: no maps; 1 or true: maps."""
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("1", "true"):
        return True
    if v in ("0", "false", ""):
        return False
    raise ApiError(400, f"maps must be 0 or 1 (or false/true), got {value[:40]!r}")


def image_error(name: str, e: BadImage) -> ApiError:
    status = 415 if isinstance(e, UnsupportedFormat) else 413 if isinstance(e, TooManyPixels) else 422
    return ApiError(status, f"{name}: {e}")


def decode_request(files: list[tuple[str, bytes]], preprocess: Preprocess, max_pixels: int, max_request_pixels: int,
                   formats) -> list[np.ndarray]:
    """Every header first (format and pixel limits, no pixel data decoded), then the pixels, by the
    live version's model card (``preprocess``): a request over its pixel budget costs only header
    parsing. Runs in the decode thread pool."""
    opened, total = [], 0
    for name, data in files:
        try:
            img = preprocess.open(data, max_pixels, formats)
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
            out.append(preprocess(img))
        except BadImage as e:
            raise image_error(name, e) from None
    return out


api = FastAPI(title="msc-dist anomaly scoring", version="1")

SCORE_DOC = """Score one image (the body, image/jpeg, image/png or image/webp) or several (multipart/form-data
file parts): a JSON list, one object per image, in order: `score`, `is_anomaly`, `threshold`,
`neighbors` ([{`id`, `distance`}], nearest first), `index_version`.

**`?maps=1`** (an index version with a patch bank; else 409): each object also holds
`patch_score` (the anomaly map's maximum), `area` (the share of the map's pixels over the
version's per-pixel `map_threshold`), `boxes` ([x0, y0, x1, y1] of the 8-connected regions over it,
map pixels, x1 and y1 exclusive, the largest first, at most 32) and `map`:
{`encoding`: "png-uint8", `width`, `height`, `scale`, `threshold`, `threshold_level`: 128, `png`}.
`png` is a base64 8-bit grayscale PNG of the map at the model's input size (the preprocessed
image, `GET /v1/model` `image_size`); grey level g = clip(round(map / (2 threshold) * 255), 0, 255),
so 128 is the threshold, 255 twice it or more, and g * `scale` is the map within half a level.
`msc predict --json` writes the same object for the same image, byte for byte, in any batch."""


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse({"error": {"status": exc.status, "message": exc.message}}, status_code=exc.status, headers=exc.headers)


@serve.deployment(name="Gateway", max_ongoing_requests=256, max_queued_requests=1024)
@serve.ingress(api)
class Gateway:
    def __init__(self, model, **settings):
        self.model = model
        self.s = AppConfig.from_args(settings)  # raises: the replica does not start
        self.api_key, mode = load_api_key(self.s)
        (log.warning if self.api_key is None else log.info)("msc Gateway auth: %s", mode)
        self.formats = tuple(self.s.formats)
        self.inflight = InflightBytes(self.s.max_inflight_bytes, self.s.retry_after_s)
        self.pool = ThreadPoolExecutor(self.s.decode_threads, thread_name_prefix="msc-decode")
        self._cards = {}  # detector (None: the one index) -> (fetched at, version, Preprocess, has maps) of its live card
        self._default = None  # (read at, name) of the registry's default detector
        self.metrics = DetectorMetrics()  # one app, one detector 'default'; with a registry, each by name

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
        retry = {"Retry-After": str(self.s.retry_after_s)}
        try:
            return await asyncio.wait_for(coro, self.s.request_timeout_s)
        except ApiError:
            raise
        except UnknownDetector as e:  # never a 500, never another detector's score
            raise ApiError(404, f"{why(e)}; GET /v1/detectors lists the detectors") from None
        except Unavailable as e:  # the index is loading, a shard is down, a roll is under way
            raise ApiError(503, f"{e}; retry later", retry) from None
        except BackPressureError:
            raise ApiError(503, "overloaded: the scoring queue is full, retry later", retry) from None
        except asyncio.TimeoutError:
            raise ApiError(503, f"timed out after {self.s.request_timeout_s}s, retry later", retry) from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
            # A model replica died or is being replaced mid-request; the next try reaches a live one.
            raise ApiError(503, "a model replica became unavailable, retry later", retry) from None
        except Exception as e:
            log.exception("request failed")
            raise ApiError(503, f"scoring failed ({type(e).__name__}), retry later", retry) from None

    async def _observed(self, detector, coro):
        """Awaits one scoring request's answer, counted in the detector's metrics (serving/metrics.py):
        its status and latency, and the scores it returns. ``detector`` None: not a served detector."""
        t0, status = time.perf_counter(), 500
        try:
            out = await coro
            status = 200
            self.metrics.scored(detector, out)
            return out
        except ApiError as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            # a name not known to exist (404) never becomes a series of its own
            self.metrics.request(None if status == 404 else detector, status, time.perf_counter() - t0)

    def _handle(self, detector: str | None):
        return self.model if detector is None else self.model.options(multiplexed_model_id=detector)

    def _keep_card(self, detector: str | None, card: dict) -> tuple:
        got = self._cards[detector] = (time.monotonic(), card["version"], Preprocess.from_dict(card["preprocess"]),
                                       bool(card.get("maps")))
        if len(self._cards) > 4096:  # names once asked for: keep the newest
            for k in list(self._cards)[:1024]:
                self._cards.pop(k, None)
        return got

    async def _live_card(self, detector: str | None = None, refresh: bool = False) -> tuple[str, Preprocess, bool]:
        """(version, Preprocess, whether it has maps) of the live index version's model card (of
        ``detector``'s, with a registry), asked of the Model at most once per ``index_poll_s`` (10 s
        when it does not poll): requests are decoded for it, and the Model scores each with the
        version it was decoded for."""
        ttl = self.s.index_poll_s or 10.0
        got = self._cards.get(detector)
        if refresh or got is None or time.monotonic() - got[0] > ttl:
            got = self._keep_card(detector, await self._handle(detector).card.remote())
        return got[1], got[2], got[3]

    async def _read(self, request: Request, take) -> bytes:
        limit = self.s.max_body_bytes
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

        max_files = self.s.max_files
        try:
            form = await MultiPartParser(request.headers, _stream(), max_files=max_files, max_fields=max_files,
                                         max_part_size=self.s.max_body_bytes).parse()
        except MultiPartException as e:
            if "Too many files" in str(e):
                raise ApiError(413, f"too many files: at most {max_files} per request") from None
            raise ApiError(400, f"malformed multipart body: {e}") from None
        files = [(f.filename or k, await f.read()) for k, f in form.multi_items() if isinstance(f, UploadFile)]
        if not files:
            raise ApiError(400, "multipart body has no files: send the images as file parts")
        return files

    @staticmethod
    def _no_maps(version: str) -> ApiError:
        return ApiError(409, f"maps=1: index version {version} has no patch bank, so no anomaly maps; score "
                             "without maps, or publish a version built with python -m msc_dist.embed --patch-bank")

    async def _decode_and_score(self, files: list[tuple[str, bytes]], detector: str | None = None,
                                maps: bool = False) -> list[dict]:
        """Decode by the live card and score with that version. A version that rolled away while
        this request was decoded (the Model answers with the new card) is decoded once more for
        the new one: never resized to fit, never scored by a model it was not made for. ``maps``
        on a version without a patch bank: 409, before any decoding."""
        loop = asyncio.get_running_loop()
        version, pre, has_maps = await self._live_card(detector)
        handle = self._handle(detector)
        for attempt in range(2):
            if maps and not has_maps:
                raise self._no_maps(version)
            arrays = await loop.run_in_executor(self.pool, decode_request, files, pre, self.s.max_pixels,
                                                self.s.max_request_pixels, self.formats)
            out = await (handle.score.remote(arrays, version, True) if maps else handle.score.remote(arrays, version))
            if isinstance(out, list):
                return out
            # {"version": live version, "preprocess": its card, "maps": ...}: ours is no longer served
            _, version, pre, has_maps = self._keep_card(detector, out)
        raise ApiError(503, "the model rolled to a new version twice during this request, retry later",
                       {"Retry-After": str(self.s.retry_after_s)})

    # --- the registry ---------------------------------------------------------------------------

    def _registry(self) -> str:
        if not self.s.registry:
            raise ApiError(404, "this app serves one index, not a registry of detectors: POST /v1/score, GET /v1/model")
        return self.s.registry

    def _detector_name(self, name: str) -> str:
        from msc_dist.registry import NAME_RULE, valid_name

        self._registry()
        if not valid_name(name):
            raise ApiError(404, f"no detector {name!r}: names are {NAME_RULE}; GET /v1/detectors lists them")
        return name

    async def _default_detector(self) -> str:
        """The registry's default detector, read at most once per ``index_poll_s`` (10 s without)."""
        from msc_dist.registry import get_default

        ttl = self.s.index_poll_s or 10.0
        if self._default is None or time.monotonic() - self._default[0] > ttl:
            self._default = (time.monotonic(), await asyncio.to_thread(get_default, self._registry()))
        if self._default[1] is None:
            raise ApiError(404, "this app serves a registry with no default detector: POST /v1/detectors/NAME/score "
                                "(GET /v1/detectors lists them), or set one with msc detectors default NAME")
        return self._default[1]

    async def _score_request(self, request: Request, detector: str | None):
        maps = maps_flag(request.query_params.get("maps"))
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in IMAGE_TYPES and ctype != "multipart/form-data":
            raise ApiError(415, f"content type {ctype!r} is not accepted; use one of {', '.join(IMAGE_TYPES)} or multipart/form-data")
        with self.inflight.request() as take:
            body = await self._read(request, take)
            files = await self._files(request, ctype, body)
            return await self._guarded(self._decode_and_score(files, detector, maps))

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model_info(self, request: Request):
        """The live version's card and index, and ``recent``: the share of this replica's recent
        images over the threshold, next to the calibrated false-positive rate."""
        self._auth(request)
        detector = await self._default_detector() if self.s.registry else None
        info = await self._guarded(self._handle(detector).info.remote())
        return {**info, "recent": {**self.metrics.recent(detector or DEFAULT), "target_fpr": info.get("target_fpr")}}

    @api.post("/v1/score", description=SCORE_DOC)
    async def score(self, request: Request):
        if not self.s.registry:
            return await self._observed(DEFAULT, self._score(request))
        detector = await self._named(request, self._default_detector())
        return await self._observed(detector, self._score_request(request, detector))

    async def _score(self, request: Request):
        self._auth(request)
        return await self._score_request(request, None)

    async def _named(self, request: Request, name) -> str:
        """Auth, then the detector a registry request is for (``name``: awaitable or str); a
        request refused before its detector is known is counted under no detector's name."""
        try:
            self._auth(request)
            return await name if asyncio.iscoroutine(name) else self._detector_name(name)
        except ApiError as e:
            self.metrics.request(None, e.status, 0.0)
            raise

    @api.get("/v1/detectors")
    async def detectors(self, request: Request):
        from msc_dist.registry import listing

        self._auth(request)
        return await self._guarded(asyncio.to_thread(listing, self._registry()))

    @api.get("/v1/detectors/{name:path}")
    async def detector_info(self, name: str, request: Request):
        """One detector of the registry, and ``recent``: the share of this replica's recent images
        over its threshold, next to the calibrated false-positive rate."""
        from msc_dist.registry import describe

        self._auth(request)
        name = self._detector_name(name)
        d = await self._guarded(asyncio.to_thread(describe, self._registry(), name))
        d.pop("checkpoint", None)  # no storage URIs to API clients
        return {**d, "score": f"/v1/detectors/{name}/score",
                "recent": {**self.metrics.recent(name), "target_fpr": d.get("target_fpr")}}

    @api.post("/v1/detectors/{name:path}/score")
    async def detector_score(self, name: str, request: Request):
        name = await self._named(request, name)
        return await self._observed(name, self._score_request(request, name))

