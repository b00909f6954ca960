"""Serving an index larger than one replica: index-shard deployments and an exact scatter-gather.

    Gateway  ->  Model (decode once, embed a batch once)  ->  IndexShard-0 .. IndexShard-{N-1}

``build_app({"index_shards": N, ...})`` (serving/app.py) builds this layout; 0, the default, is
the single ``Model`` deployment that holds the whole index. Here the ``Model`` deployment holds
only the model. Deployment ``IndexShard-g`` serves the manifest shards i with i % N == g of the
published index version (checksums checked at load, the model id before any answer, on a GPU when
the replica has one) and scales on its own load. The Model sends each batch of query vectors to
every shard group concurrently and merges their top-k into the global top-k: the same scores and
neighbours as one search of the unsharded index (``msc_dist.index.merged_scores``).

No partial answers. A shard group that is missing, fails or does not answer within
``shard_timeout_s`` fails the whole batch with ``ShardUnavailable``, which the Gateway answers with
503 + Retry-After. Every request is tagged with one index version: the Model makes a version live
only after every shard group has loaded it (``prepare``), shard replicas keep the previous
``keep_versions - 1`` versions loaded during a roll, answer only for the version asked, and the
merge refuses answers of another version. A replica that has not yet loaded the version asked (a
new replica, or one that missed the roll) starts loading it and answers 503 until it has."""

# No `from __future__ import annotations`: Serve inspects the deployment classes.
import asyncio
import logging
import time

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError

from serving.app import DEFAULTS, Gateway

log = logging.getLogger("msc_dist.serving.sharded")

SHARDED_DEFAULTS = {
    "index_shards": 0,  # 0: one Model deployment holding the whole index (serving/app.py)
    "shard_timeout_s": 5.0,  # a shard group slower than this fails the batch (503, retried by the client)
    "shard_load_timeout_s": 600.0,  # how long the Model waits for every group to load a new version
    "index_poll_s": 10.0,  # re-read the index pointer this often and roll to a new version (0: never)
    "keep_versions": 2,  # versions a shard replica keeps loaded (the live one and the one before)
}
MODEL_KEYS = ("checkpoint", "index", "device", "max_batch_size", "batch_wait_timeout_s", "shard_timeout_s",
              "shard_load_timeout_s", "index_poll_s")
SHARD_KEYS = ("index", "device", "keep_versions")


class ShardUnavailable(BackPressureError):
    """No complete answer from the index shards of one version: the Gateway answers 503 with
    Retry-After (a BackPressureError for it, also through Ray's task-error wrapping)."""

    def __init__(self, message: str = "an index shard is unavailable", retry_after_s: float | None = None):
        super().__init__(0, 0, 503, retry_after_s)
        self.args = (message, retry_after_s)
        self._message = message

    def __str__(self) -> str:
        return self._message


def _expand(p: str) -> str:
    import os

    return p if "://" in p else os.path.expanduser(p)


def _why(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]


@serve.deployment(name="IndexShard", max_ongoing_requests=64, max_queued_requests=256)
class IndexShard:
    """One group of shards of the published index, a few versions at a time (during a roll)."""

    def __init__(self, group: int, groups: int, index: str, device: str = "auto", keep_versions: int = 2):
        self.group, self.groups = int(group), int(groups)
        self.versions = {}  # version -> ShardedIndex of this group's shards, oldest first
        self.loading = {}  # version -> asyncio task
        self._settings(index, device, keep_versions)
        self._load(None, None)  # the live version now: a replica starts ready, or says why it cannot

    def _settings(self, index: str, device: str, keep_versions: int) -> None:
        import ray

        self.index, self.device, self.keep = _expand(index), device, max(1, int(keep_versions))
        self.use_gpu = device == "cuda" or (device == "auto" and bool(ray.get_gpu_ids()))

    def reconfigure(self, cfg: dict) -> None:
        cfg = cfg or {}
        self._settings(cfg.get("index", self.index), cfg.get("device", self.device), cfg.get("keep_versions", self.keep))
        self._load(None, None)

    def _load(self, version: str | None, model_id: str | None):
        """This group's shards of ``version`` (None: the one the pointer names), loaded once."""
        from msc_dist import storage
        from msc_dist.index import MANIFEST, IndexMismatch, load_shards, read_manifest, shard_group, version_root

        if version in self.versions:
            return self.versions[version]
        pinned = storage.exists(storage.join(self.index, MANIFEST))  # a version folder, not a pointer root
        path = self.index if version is None or pinned else version_root(self.index, version)
        man, _ = read_manifest(path)
        if version is not None and man.version != version:
            raise IndexMismatch(f"{self.index} is pinned to version {man.version}, not {version}")
        idx = self.versions.get(man.version)
        if idx is None:
            numbers = shard_group(len(man.shards), self.group, self.groups)
            if not numbers:
                raise IndexMismatch(f"index version {man.version} has {len(man.shards)} shards, fewer than the "
                                    f"{self.groups} index-shard deployments: rebuild it with --num-shards "
                                    f"{self.groups} or more, or lower index_shards")
            idx = load_shards(path, numbers, expected_model_id=model_id, use_gpu=self.use_gpu, version=man.version)
            self.versions[man.version] = idx
            log.info("index shard group %d/%d: version %s, shards %s, %d vectors%s", self.group, self.groups,
                     man.version, numbers, len(idx.ids), " on GPU" if self.use_gpu else "")
        while len(self.versions) > self.keep and next(iter(self.versions)) != man.version:
            del self.versions[next(iter(self.versions))]
        return idx

    async def _ensure(self, version: str, model_id: str):
        if version in self.versions:
            return self.versions[version]
        task = self.loading.get(version)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._load, version, model_id))
            self.loading[version] = task
            task.add_done_callback(lambda t, v=version: (self.loading.pop(v, None), t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    def _checked(self, idx, version: str, model_id: str):
        if idx.manifest.model_id != model_id:
            raise ShardUnavailable(f"index shard group {self.group}: version {version} was built with model "
                                   f"{idx.manifest.model_id[:12]}…, not the Model's {model_id[:12]}…")
        return idx

    async def prepare(self, version: str, model_id: str) -> dict:
        """Load ``version`` (if not yet) and say which shards this group serves of it."""
        idx = self._checked(await self._ensure(version, model_id), version, model_id)
        return {"group": self.group, "version": version, "shards": list(idx.shard_numbers)}

    async def search(self, q: np.ndarray, k: int, version: str, model_id: str) -> dict:
        """Top-k of this group's shards of ``version``: squared distances and sample ids (None
        where the group holds fewer than k vectors)."""
        idx = self.versions.get(version)
        if idx is None:
            asyncio.ensure_future(self._ensure(version, model_id)).add_done_callback(
                lambda t: t.cancelled() or t.exception())
            raise ShardUnavailable(f"index shard group {self.group} has not loaded version {version} yet, retry later")
        self._checked(idx, version, model_id)
        d, rows = await asyncio.to_thread(idx.search, q, k)
        ids = idx.ids[np.maximum(rows, 0)].astype(object)
        ids[rows < 0] = None
        return {"group": self.group, "version": version, "shards": list(idx.shard_numbers), "d": d, "ids": ids}

    def versions_loaded(self) -> list[str]:
        return list(self.versions)


def merge_answers(answers: list[dict], k: int, version: str, num_shards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group top-k -> (scores, distances, ids) of the global top-k, exactly one search of the
    whole index. Refuses (ShardUnavailable) answers of another version or that do not cover
    every shard exactly once."""
    from msc_dist.index import merged_scores

    got = sorted({a["version"] for a in answers})
    if got != [version]:
        raise ShardUnavailable(f"index shards answered for versions {got}, not {version} alone (a roll is under way), retry")
    covered = sorted(s for a in answers for s in a["shards"])
    if covered != list(range(num_shards)):
        raise ShardUnavailable(f"index shards {covered} answered, not all {num_shards} of version {version}, retry")
    answers = sorted(answers, key=lambda a: min(a["shards"]))
    d = np.concatenate([a["d"] for a in answers], axis=1)
    ids = np.concatenate([a["ids"] for a in answers], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return (merged_scores([a["d"] for a in answers], k), np.take_along_axis(d, order, axis=1),
            np.take_along_axis(ids, order, axis=1))


def _at_size(im: np.ndarray, s: int) -> np.ndarray:
    """(S', S', 3) uint8 -> (S, S, 3): images decoded for an older model's size during a roll
    (one batch can hold both sizes)."""
    if im.shape[0] == s and im.shape[1] == s:
        return im
    import torch

    x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear")
    return x.round().clamp(0, 255).byte()[0].permute(1, 2, 0).numpy()


class _Live:
    """What one request uses, swapped in one assignment: a model and the index version paired with it."""

    def __init__(self, model: dict, manifest):
        self.model, self.manifest = model, manifest
        self.version, self.model_id = manifest.version, model["model_id"]


@serve.deployment(name="Model", max_ongoing_requests=64, max_queued_requests=256)
class ShardedModel:
    """The model (decoding and batching as in serving/app.py's Model), no index: each batch is
    embedded once and searched on every index-shard group."""

    def __init__(self, shards: list, **settings):
        self.shards = list(shards)
        self.s = {**DEFAULTS, **SHARDED_DEFAULTS, **settings}
        self.live = None
        self.model = None
        self._next_check = 0.0
        self._refresh_task = None
        self._lock = asyncio.Lock()
        self._load_model()
        self._batching()

    def _load_model(self) -> None:
        import torch

        from msc_dist.checkpoint import load_model, resize_mode, resolve

        url = self.s.get("checkpoint")
        if not url:  # none given: the checkpoint that built the index (recorded in its manifest)
            from msc_dist.index import read_manifest

            url = read_manifest(_expand(self.s["index"]))[0].extra.get("checkpoint")
            if not url:
                raise ValueError("no checkpoint given and none recorded in the index manifest")
        url = _expand(url)
        if self.model is None or self.model["url"] != url:
            dev = self.s.get("device", "auto")
            dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
            path = resolve(url)
            model, _, config, model_id = load_model(path, dev)
            self.model = {"url": url, "checkpoint": path, "model": model, "config": config, "model_id": model_id,
                          "device": dev, "image_size": int(config["image_size"]),
                          "resize_mode": resize_mode(config)}

    def _batching(self) -> None:
        self.score_batch.set_max_batch_size(int(self.s["max_batch_size"]))
        self.score_batch.set_batch_wait_timeout_s(float(self.s["batch_wait_timeout_s"]))

    async def reconfigure(self, user_config: dict) -> None:
        self.s = {**self.s, **(user_config or {})}
        await asyncio.to_thread(self._load_model)
        self._batching()
        self._next_check = 0.0
        try:
            await self._refresh()
        except Exception as e:  # keep serving the live version; the next request tries again
            log.warning("index version not rolled yet: %s", _why(e))

    async def _fan(self, method: str, *args, timeout: float) -> list:
        calls = [getattr(h, method).remote(*args) for h in self.shards]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*calls), timeout))
        except asyncio.TimeoutError:
            why = f"an index shard did not answer within {timeout:g}s"
        except Exception as e:  # a dead replica, a shard that refused: no partial answer
            why = f"an index shard failed: {_why(e)}"
        for c in calls:
            c.cancel()
        raise ShardUnavailable(why + ", retry later", float(self.s["retry_after_s"]))

    async def _refresh(self) -> None:
        """Read the version the index setting names; once every shard group has loaded it (and it
        matches the model), make it live. Requests in flight keep the version they started with."""
        from msc_dist.index import IndexMismatch, read_manifest

        async with self._lock:
            self._next_check = time.monotonic() + (float(self.s["index_poll_s"]) or float("inf"))
            model = self.model
            man, _ = await asyncio.to_thread(read_manifest, _expand(self.s["index"]))
            live = self.live
            if live is not None and live.version == man.version and live.model_id == model["model_id"]:
                return
            if man.model_id != model["model_id"]:
                raise IndexMismatch(f"index version {man.version} was built with model {man.model_id[:12]}…, not the "
                                    f"checkpoint's {model['model_id'][:12]}…: rebuild it with python -m msc_dist.embed")
            answers = await self._fan("prepare", man.version, model["model_id"],
                                      timeout=float(self.s["shard_load_timeout_s"]))
            covered = sorted(s for a in answers for s in a["shards"])
            if covered != list(range(len(man.shards))):
                raise IndexMismatch(f"index shard groups cover shards {covered} of {len(man.shards)}")
            self.live = _Live(model, man)
            log.info("live: model %s, index version %s over %d shard groups", model["model_id"][:12], man.version,
                     len(self.shards))

    def _refresh_done(self, t) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.warning("index version check failed: %s", _why(t.exception()))
            self._next_check = time.monotonic() + 1.0

    async def _current(self) -> _Live:
        if self.live is None:
            try:
                await self._refresh()
            except ShardUnavailable:
                raise
            except Exception as e:
                raise ShardUnavailable(f"the index is not ready: {_why(e)}", float(self.s["retry_after_s"])) from None
        elif time.monotonic() >= self._next_check and (self._refresh_task is None or self._refresh_task.done()):
            self._refresh_task = asyncio.ensure_future(self._refresh())
            self._refresh_task.add_done_callback(self._refresh_done)
        if self.live is None:
            raise ShardUnavailable("the index is not ready, retry later", float(self.s["retry_after_s"]))
        return self.live

    async def _search(self, live: _Live, z: np.ndarray) -> list[dict]:
        k = live.manifest.k
        answers = await self._fan("search", z, k, live.version, live.model_id, timeout=float(self.s["shard_timeout_s"]))
        scores, dists, ids = merge_answers(answers, k, live.version, len(live.manifest.shards))
        thr = live.manifest.threshold
        return [{"score": float(s), "is_anomaly": None if thr is None else bool(s > thr), "threshold": thr,
                 "neighbors": [{"id": str(i), "distance": float(dd)} for dd, i in zip(d, row) if i is not None],
                 "index_version": live.version}
                for s, d, row in zip(scores, dists, ids)]

    # Two batches at once: one embeds (in a thread, off the event loop) while the other waits for
    # the shards.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def score_batch(self, images: list[np.ndarray]) -> list[dict]:
        import torch

        from msc_dist.features import embed_images

        live = await self._current()  # one model and one index version for the whole batch
        m = live.model
        s = m["image_size"]
        x = torch.from_numpy(np.stack([_at_size(im, s) for im in images])).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        def embed():
            with torch.no_grad():
                return embed_images(m["model"], x, m["device"]).numpy()

        return await self._search(live, await asyncio.to_thread(embed))

    async def score(self, images: list[np.ndarray]) -> list[dict]:
        return list(await asyncio.gather(*(self.score_batch(im) for im in images)))

    async def info(self) -> dict:
        live = await self._current()
        m, man = live.model, live.manifest
        return {"model_id": m["model_id"], "backbone": m["config"]["backbone"], "image_size": m["image_size"],
                "resize_mode": m["resize_mode"], "index_size": man.count, "dimension": man.dimension, "k": man.k, "threshold": man.threshold,
                "target_fpr": man.target_fpr, "checkpoint": m["checkpoint"], "index_version": man.version,
                "index_shards": len(man.shards), "index_shard_groups": len(self.shards)}


def build_sharded_app(args: dict):
    """Gateway -> sharded Model -> ``index_shards`` IndexShard deployments. ``shard_options``
    (a dict for every group, or a list of one per group) sets their deployment options, as
    ``model_options`` / ``gateway_options`` do for the others."""
    args = {**DEFAULTS, **SHARDED_DEFAULTS, **args}
    n = int(args.pop("index_shards"))
    if n < 1:
        raise ValueError("index_shards must be at least 1 for the sharded layout")
    model_opts, gateway_opts = args.pop("model_options", None) or {}, args.pop("gateway_options", None) or {}
    shard_opts = args.pop("shard_options", None) or {}
    per_group = shard_opts if isinstance(shard_opts, list) else [shard_opts] * n
    if len(per_group) != n:
        raise ValueError(f"shard_options has {len(per_group)} entries for {n} index shards")
    shards = [IndexShard.options(name=f"IndexShard-{g}", **per_group[g]).bind(g, n, **{k: args[k] for k in SHARD_KEYS})
              for g in range(n)]
    model = ShardedModel.options(**model_opts).bind(shards, **{k: args[k] for k in MODEL_KEYS})
    rest = {k: v for k, v in args.items() if k not in MODEL_KEYS + SHARD_KEYS + tuple(SHARDED_DEFAULTS)}
    return Gateway.options(**gateway_opts).bind(model, **rest)
