"""Ray Serve scoring app: a FastAPI gateway (validation, auth, decoding) in front of an
autoscaled model deployment that batches single images across requests with ``@serve.batch``.

    POST /v1/score   one image body (image/jpeg|png|webp) or multipart/form-data with several
    GET  /v1/model   model id, backbone, image size, index size, threshold
    GET  /healthz
    GET  /docs, /openapi.json

Bad input gets a 4xx JSON error ``{"error": {"status", "message"}}``; overload gets 503 with
Retry-After; every call to the model has a deadline, so no request hangs."""

# No `from __future__ import annotations` here: FastAPI must see real `Request` annotations.
import asyncio
import hmac
import logging
import os
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from msc_dist.data.decode import BadImage, decode_image

log = logging.getLogger("msc_dist.serving")

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")

DEFAULTS = {
    "checkpoint": "~/msc_runs/msc",  # a checkpoint, or a run folder (its newest checkpoint)
    "index": "~/msc_runs/msc/serving",  # the embedding job's --out
    "device": "auto",  # auto = cuda when the replica has a GPU
    "max_batch_size": 32,
    "batch_wait_timeout_s": 0.005,
    "max_body_bytes": 20 * 1024 * 1024,
    "max_files": 16,
    "max_pixels": 40_000_000,
    "request_timeout_s": 20.0,
    "retry_after_s": 1,
    "api_key_env": "MSC_API_KEY",
    "api_key_file": None,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _expand(p: str) -> str:
    return p if "://" in p else os.path.expanduser(p)


@serve.deployment(name="Model", max_ongoing_requests=64, max_queued_requests=256)
class Model:
    """Holds a Scorer (model + index). A new checkpoint or index rolls in through
    ``user_config``: the new Scorer is loaded beside the old one, then swapped in one assignment,
    so requests in flight finish on the old one and none is dropped."""

    def __init__(self, **settings):
        self.settings = {**DEFAULTS, **settings}
        self.scorer = None
        self._apply(self.settings)

    def _apply(self, s: dict) -> None:
        import torch

        from msc_dist.scorer import Scorer

        want = (_expand(s["checkpoint"]), _expand(s["index"]))
        if self.scorer is None or want != (self._loaded_ckpt, self._loaded_index):
            dev = s.get("device", "auto")
            if dev == "auto":
                dev = "cuda" if torch.cuda.is_available() else "cpu"
            from msc_dist.checkpoint import resolve

            # Scorer checks the index manifest's model_id against the checkpoint: a mismatch
            # stops the replica from starting, with a message that says so.
            new = Scorer(resolve(want[0]), want[1], device=dev, use_gpu_index=dev == "cuda")
            self.scorer, self._loaded_ckpt, self._loaded_index = new, *want
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
        s = scorer.image_size
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, S', S') uint8
        if x.shape[-1] != s:  # decoded for an older model's size during a roll
            x = torch.nn.functional.interpolate(x.float(), size=(s, s), mode="bilinear").round().clamp(0, 255).byte()
        return [r.to_dict() for r in scorer.score_embeddings(scorer.embed(x))]

    async def score(self, images: list[np.ndarray]) -> list[dict]:
        return list(await asyncio.gather(*(self.score_batch(im) for im in images)))

    def info(self) -> dict:
        return self.scorer.info()


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
        self.api_key = self._load_key()
        self._size = None  # (fetched at, image size)

    def _load_key(self) -> str | None:
        path = self.s.get("api_key_file")
        if path and os.path.exists(path):
            return open(path).read().strip() or None
        return os.environ.get(self.s.get("api_key_env") or "", "") or None

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        # compare_digest: constant time in the length of the key.
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})

    async def _call(self, method: str, *args):
        try:
            return await asyncio.wait_for(getattr(self.model, method).remote(*args), self.s["request_timeout_s"])
        except BackPressureError:
            raise ApiError(503, "overloaded: the scoring queue is full, retry later",
                           {"Retry-After": str(self.s["retry_after_s"])}) from None
        except asyncio.TimeoutError:
            raise ApiError(503, f"timed out after {self.s['request_timeout_s']}s, retry later",
                           {"Retry-After": str(self.s["retry_after_s"])}) from None

    async def _image_size(self) -> int:
        if self._size is None or time.monotonic() - self._size[0] > 10:
            self._size = (time.monotonic(), int((await self._call("info"))["image_size"]))
        return self._size[1]

    async def _read(self, request: Request) -> bytes:
        limit = self.s["max_body_bytes"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"body is {declared} bytes, above the limit of {limit}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ApiError(413, f"body is above the limit of {limit} bytes")
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
            raise ApiError(400, "multipart body has no files")
        return files

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model_info(self, request: Request):
        self._auth(request)
        return await self._call("info")

    @api.post("/v1/score")
    async def score(self, request: Request):
        self._auth(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in IMAGE_TYPES and ctype != "multipart/form-data":
            raise ApiError(415, f"content type {ctype!r} is not accepted; use one of {', '.join(IMAGE_TYPES)} or multipart/form-data")
        body = await self._read(request)
        files = await self._files(request, ctype, body)
        size = await self._image_size()
        arrays = []
        for name, data in files:
            try:
                arrays.append(decode_image(data, size, int(self.s["max_pixels"])))
            except BadImage as e:
                status = 413 if "above the limit" in str(e) or "bomb" in str(e) else 422
                raise ApiError(status, f"{name}: {e}") from None
        return await self._call("score", arrays)


def build_app(args: dict | None = None):
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` override DEFAULTS.
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
    model = Model.options(**model_opts).bind(**{k: args[k] for k in model_keys})
    return Gateway.options(**gateway_opts).bind(model, **{k: v for k, v in args.items() if k not in model_keys})


app = build_app
