"""The Model deployment of both serving layouts, and how it follows the published index version.

    single layout:   Gateway -> Model (card + the whole index)
    sharded layout:  Gateway -> Model (card only) -> IndexShard-0 .. IndexShard-{N-1}

A replica holds one ``Scorer`` per index version it serves (``Versions``): the model card of the
checkpoint that built the version (the manifest's, or the ``checkpoint`` setting) and a searcher,
``LocalSearcher`` over the loaded index or, with index-shard deployments, the fan-out of
serving/sharded.py. Every ``index_poll_s`` it re-reads the index pointer; a newly published
version is loaded beside the live one and made live in one assignment, so requests in flight
finish on the version they started with and none is dropped. The Gateway decodes each request
by the live version's card and sends the version with the pixels; the Model scores them with that
version while it still holds it (``keep_versions``), and otherwise answers with the card of the
live version, for which the Gateway decodes the request again: an image is never resized to fit
another model. A ``index`` setting that names one version folder is pinned: it never rolls."""

# No `from __future__ import annotations`: Serve inspects the deployment classes.
import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict

import numpy as np
from ray import serve

from serving.errors import Unavailable, why
from serving.settings import AppConfig

log = logging.getLogger("ray.serve")

# The settings the Model takes (its user_config; the rest are the Gateway's).
MODEL_KEYS = ("index", "registry", "checkpoint", "device", "runtime", "max_batch_size", "batch_wait_timeout_s",
              "index_poll_s", "keep_versions", "max_detectors_per_replica", "retry_after_s", "shard_timeout_s",
              "shard_load_timeout_s")
# These change what a replica loads; the others only how it batches.
_LOAD_KEYS = ("index", "registry", "checkpoint", "device", "runtime", "keep_versions")
GONE = "__version_gone__"
# The attribute under which @serve.multiplexed keeps its LRU cache (ray.serve.api.multiplexed).
_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"


def with_maps(results: list, map_threshold: float) -> list[dict]:
    """Score results with their maps -> answers: each result's dict + patch_score, area, boxes and
    the map in the wire encoding (msc_dist.maps.encode_map, the bytes ``msc predict --json`` writes)."""
    from msc_dist.maps import summary

    return [{**r.to_dict(), **(summary(r.map, map_threshold, encode=True) if r.map is not None else {})}
            for r in results]


class Versions:
    """The index versions one replica holds, oldest first, the live one last: the roll policy of
    both layouts. ``load(manifest, folder)`` builds the Scorer of one version."""

    def __init__(self, cfg: AppConfig, load, detector: str | None = None):
        self.cfg, self.load, self.detector = cfg, load, detector
        self.removed = False  # a registry detector whose pointer was taken away (msc detectors remove)
        self.held: "OrderedDict[str, object]" = OrderedDict()
        self._lock = asyncio.Lock()
        self._next_check = 0.0
        self._task = None

    @property
    def live(self):
        return next(reversed(self.held.values())) if self.held else None

    async def refresh(self) -> None:
        """Read the version the index setting names; load it if new and make it live."""
        from msc_dist.index import read_manifest
        from msc_dist.storage import expand

        async with self._lock:
            self._next_check = time.monotonic() + (self.cfg.index_poll_s or float("inf"))
            if self.detector is not None:
                from msc_dist.index import read_pointer

                was, self.removed = self.removed, await asyncio.to_thread(read_pointer, self.cfg.index) is None
                if self.removed:
                    if not was and self.held:
                        log.info("detector %s was removed from the registry: 404 from now on", self.detector)
                    return
            man, folder = await asyncio.to_thread(read_manifest, expand(self.cfg.index))
            if man.version in self.held:
                if man.version != next(reversed(self.held)):  # the pointer went back to a version still held
                    self.held.move_to_end(man.version)
                    log.info("live again: index version %s", man.version)
                return
            scorer = await self.load(man, folder)
            self.held[man.version] = scorer
            while len(self.held) > self.cfg.keep_versions:
                self.held.popitem(last=False)
            log.info("live: index version %s (model %s, %d vectors, %s); holding %s", man.version,
                     scorer.model_id[:12], man.count, scorer.preprocess.describe(), list(self.held))

    def _refresh_failed(self, t) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.warning("index version check failed (still serving %s): %s",
                        next(reversed(self.held), None), why(t.exception()))
            self._next_check = time.monotonic() + 1.0

    def _check_removed(self) -> None:
        if self.removed:
            from msc_dist.registry import UnknownDetector

            raise UnknownDetector(f"no detector {self.detector!r}: it was removed from the registry")

    async def current(self):
        """The live Scorer; starts a background check of the pointer when one is due. A removed
        detector raises UnknownDetector (its pointer is read again once per poll interval)."""
        if self.removed:
            if time.monotonic() >= self._next_check:
                await self.refresh()
            self._check_removed()
        if not self.held:
            try:
                await self.refresh()
            except Unavailable:
                raise
            except Exception as e:
                raise Unavailable(f"the index is not ready: {why(e)}", self.cfg.retry_after_s) from None
            self._check_removed()
        elif time.monotonic() >= self._next_check and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self.refresh())
            self._task.add_done_callback(self._refresh_failed)
        return self.live

    async def get(self, version: str):
        """The Scorer of ``version``, or None when this replica does not hold it. A version it does
        not know may be newer (another replica rolled first): the pointer is read again first."""
        if version not in self.held:
            try:
                await self.refresh()
            except Exception as e:
                log.warning("index version check failed: %s", why(e))
        return self.held.get(version)


class Detector:
    """One registry detector on one replica: its ``Versions`` (which follow REGISTRY/NAME's
    pointer and roll on their own). Serve's multiplexing calls ``__del__`` when it unloads the
    detector (LRU), which counts the eviction."""

    def __init__(self, name: str, versions: Versions, on_unload):
        self.name, self.versions, self._on_unload = name, versions, on_unload
        self.loaded_at = time.time()

    def __del__(self):
        cb, self._on_unload = getattr(self, "_on_unload", None), None
        if cb is not None:
            cb(self)


@serve.deployment(name="Model", max_ongoing_requests=64, max_queued_requests=256)
class Model:
    """One Scorer per held index version; ``shards`` (index-shard deployment handles) makes it the
    sharded layout's Model, whose searcher fans out to them. With a ``registry`` it is the
    multiplexed Model: each request names a detector (``multiplexed_model_id``), and a replica
    holds the ``Versions`` of at most ``max_detectors_per_replica`` of them (Serve's LRU)."""

    def __init__(self, shards=None, **settings):
        # Nothing is loaded here: build_app always gives the deployment a user_config, which Serve
        # applies (reconfigure) before the replica takes requests.
        self.shards = list(shards or [])
        self.cfg = AppConfig.from_args(settings)
        self.versions = None
        self.cards = {}  # (checkpoint url, device, runtime) -> ModelCard, shared by the versions it built
        self.detectors: dict = {}  # name -> Detector held by Serve's multiplexing cache on this replica
        self._opening: dict = {}  # name -> the task loading it (it outlives a request that gave up waiting)
        self.counts = {"loads": 0, "evictions": 0, "load_s": 0.0}
        self._configured = False

    async def reconfigure(self, user_config: dict) -> None:
        cfg = AppConfig.from_args({**self.cfg.args(), **(user_config or {})}, source="Model user_config")
        reload = not self._configured or any(getattr(cfg, k) != getattr(self.cfg, k) for k in _LOAD_KEYS)
        self.cfg = cfg
        self.score_batch.set_max_batch_size(cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._set_capacity()
        if cfg.registry:
            if reload:  # another registry: every detector is loaded from it afresh
                cache = getattr(self, _MULTIPLEX_ATTR, None)
                self.detectors, self._opening, self.versions = {}, {}, None
                if cache is not None:
                    cache.models.clear()
            for d in self.detectors.values():
                d.versions.cfg = dataclasses.replace(cfg, index=d.versions.cfg.index)
            self._configured = True
            return
        if not reload:
            self.versions.cfg = cfg
            return
        versions = Versions(cfg, self._load)
        if self.shards:
            try:  # the shard groups may still be starting: requests get 503 until they are up
                await versions.refresh()
            except Exception as e:
                log.warning("index version not live yet: %s", why(e))
        else:
            await versions.refresh()  # a bad index or checkpoint stops the replica, with the reason
        self.versions = versions  # one assignment: requests in flight keep the Scorer they hold
        self._configured = True

    # --- the registry: one Versions per detector, loaded on first use, LRU-unloaded -----------

    def _set_capacity(self) -> None:
        cache = getattr(self, _MULTIPLEX_ATTR, None)  # made by Serve on the first call
        if cache is not None:
            cache.max_num_models_per_replica = self.cfg.max_detectors_per_replica

    @serve.multiplexed(max_num_models_per_replica=4)  # max_detectors_per_replica, set at the first load
    async def _detector(self, name: str) -> Detector:
        self._set_capacity()
        task = self._opening.get(name)
        if task is None:
            task = self._opening[name] = asyncio.ensure_future(self._open(name))
        try:
            # shielded: a request past its deadline gives up waiting, the load goes on for the next one
            det = await asyncio.shield(task)
        finally:
            if task.done() and self._opening.get(name) is task:
                del self._opening[name]
        self.detectors[name] = det
        return det

    async def _check_known(self, name: str) -> None:
        """UnknownDetector unless ``name`` is a live detector of the registry (read from storage)."""
        from msc_dist import registry
        from msc_dist.index import read_pointer

        if not registry.valid_name(name):
            raise registry.UnknownDetector(f"no detector {name!r}: names are {registry.NAME_RULE}")
        if await asyncio.to_thread(read_pointer, registry.root(self.cfg.registry, name)) is None:
            raise registry.UnknownDetector(f"no detector {name!r} in the registry")

    async def _open(self, name: str) -> Detector:
        from msc_dist import registry

        await self._check_known(name)
        t0 = time.perf_counter()
        versions = Versions(dataclasses.replace(self.cfg, index=registry.root(self.cfg.registry, name)), self._load, name)
        try:
            await versions.refresh()
        except registry.UnknownDetector:
            raise
        except Exception as e:
            raise Unavailable(f"detector {name!r} is not ready: {why(e)}", self.cfg.retry_after_s) from None
        versions._check_removed()  # no pointer: not in the registry (or removed)
        dt = time.perf_counter() - t0
        self.counts["loads"] += 1
        self.counts["load_s"] += dt
        log.info("loaded detector %s (index version %s) in %.2fs; holding %d of at most %d", name,
                 versions.live.version, dt, len(self.detectors) + 1, self.cfg.max_detectors_per_replica)
        return Detector(name, versions, self._unloaded)

    def _unloaded(self, det: Detector) -> None:
        if self.detectors.get(det.name) is det:
            del self.detectors[det.name]
            self.counts["evictions"] += 1
            log.info("unloaded detector %s (least recently used; at most %d a replica)", det.name,
                     self.cfg.max_detectors_per_replica)

    def _name(self) -> str | None:
        """The detector this request names (registry mode), else None (the one index)."""
        if not self.cfg.registry:
            return None
        name = serve.get_multiplexed_model_id()
        if not name:
            from msc_dist.registry import UnknownDetector

            raise UnknownDetector("no detector named: this app serves a registry (GET /v1/detectors lists them)")
        return name

    # --- loading one index version ------------------------------------------------------------

    def _device(self):
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu") if self.cfg.device == "auto" else self.cfg.device

    def _card(self, manifest):
        from msc_dist.card import load_card
        from msc_dist.scorer import checkpoint_of

        url = checkpoint_of(manifest, self.cfg.checkpoint)
        key = (url, self._device(), self.cfg.runtime)
        card = self.cards.get(key)
        if card is None or card.model_id != manifest.model_id:
            card = load_card(url, key[1], self.cfg.runtime)  # a CPU runtime: the graph built once, cached
            self.cards[key] = card
        return card

    def _held_versions(self) -> list:
        return ([self.versions] if self.versions else []) + [d.versions for d in self.detectors.values()]

    async def _load(self, manifest, folder):
        from msc_dist.index import load_index
        from msc_dist.scorer import LocalSearcher, Scorer

        card = await asyncio.to_thread(self._card, manifest)
        if self.shards:
            from serving.sharded import FanOutSearcher

            searcher = FanOutSearcher(self.shards, manifest, self.cfg)
            await searcher.prepare()
        else:
            gpu = str(card.device).startswith("cuda")
            searcher = LocalSearcher(await asyncio.to_thread(load_index, folder, None, gpu))
        scorer = Scorer(card, searcher)  # checks the pair: model id, image size, resize mode
        held = {id(s.card) for v in self._held_versions() for s in v.held.values()} | {id(card)}
        self.cards = {u: c for u, c in self.cards.items() if id(c) in held}
        return scorer

    async def _versions(self, name: str | None = None) -> Versions:
        if name is not None:
            if name not in self.detectors:  # not held here: is it in the registry at all?
                await self._check_known(name)
            return (await self._detector(name)).versions
        if self.versions is None:
            raise Unavailable("no model loaded yet (the deployment has no user_config)", self.cfg.retry_after_s)
        return self.versions

    # Two batches at once: one embeds (in a thread, off the event loop) while the other searches.
    # Serve splits batches by multiplexed model id; the keys (detector, version) keep each part apart too.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def score_batch(self, images: list, keys: list) -> list:
        out = [None] * len(images)
        for key in dict.fromkeys(keys):  # one (detector, version, maps) at a time: a batch never mixes two
            name, v, want = key
            held = await self._versions(name)
            idx = [i for i, u in enumerate(keys) if u == key]
            scorer = await held.get(v)
            if scorer is None or (want and scorer.map_threshold is None):
                for i in idx:
                    out[i] = GONE
                continue
            x = np.stack([images[i] for i in idx])
            scorer.preprocess.check(x)  # decoded for this version's card, or refused: never resized
            results = await scorer.ascore_arrays(x, maps=want)
            rows = await asyncio.to_thread(with_maps, results, scorer.map_threshold) if want else [r.to_dict() for r in results]
            for i, r in zip(idx, rows):
                out[i] = r
        return out

    async def score(self, images: list, version: str, maps: bool = False):
        """Results for images decoded for ``version``'s card (with ``maps``: each with its anomaly
        map, msc_dist.maps.summary); or, when this replica no longer holds that version (or it has
        no maps to give), the live card ({"version", "preprocess", "maps"}) to decode them for."""
        name = self._name()
        held = await self._versions(name)
        await held.current()
        res = list(await asyncio.gather(*(self.score_batch(im, (name, version, bool(maps))) for im in images)))
        if any(r is GONE or r == GONE for r in res):
            return await self.card()
        return res

    async def card(self) -> dict:
        """The live version, its model card's preprocessing (what the Gateway decodes for) and
        whether it gives anomaly maps (it has a patch bank)."""
        live = await (await self._versions(self._name())).current()
        return {"version": live.version, "preprocess": live.preprocess.to_dict(), "maps": live.map_threshold is not None}

    async def info(self) -> dict:
        live = await (await self._versions(self._name())).current()
        return {**live.info(), "index_shard_groups": len(self.shards)}

    def stats(self) -> dict:
        """This replica's detectors: which it holds, how many it loaded and unloaded (LRU)."""
        ctx = serve.get_replica_context()
        return {"replica": ctx.replica_id.unique_id if ctx else None, "held": sorted(self.detectors),
                "max_detectors_per_replica": self.cfg.max_detectors_per_replica, **self.counts}

    def check_health(self) -> None:
        if self.cfg.registry:
            if not self._configured:
                raise RuntimeError("no registry configured: the Model deployment was started without a user_config")
            return
        if self.versions is None or (not self.shards and self.versions.live is None):
            raise RuntimeError("no model loaded: the Model deployment was started without a user_config")
