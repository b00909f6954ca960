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
import logging
import time
from collections import OrderedDict

import numpy as np
from ray import serve

from serving.errors import Unavailable, why
from serving.settings import AppConfig

log = logging.getLogger("ray.serve")

# The settings the Model takes (its user_config; the rest are the Gateway's).
MODEL_KEYS = ("index", "checkpoint", "device", "runtime", "max_batch_size", "batch_wait_timeout_s", "index_poll_s",
              "keep_versions", "retry_after_s", "shard_timeout_s", "shard_load_timeout_s")
# These change what a replica loads; the others only how it batches.
_LOAD_KEYS = ("index", "checkpoint", "device", "runtime", "keep_versions")
GONE = "__version_gone__"


def with_maps(results: list, map_threshold: float) -> list[dict]:
    """Score results with their maps -> answers: each result's dict + patch_score, area, boxes and
    the map in the wire encoding (msc_dist.maps.encode_map, the bytes ``msc predict --json`` writes)."""
    from msc_dist.maps import summary

    return [{**r.to_dict(), **(summary(r.map, map_threshold, encode=True) if r.map is not None else {})}
            for r in results]


class Versions:
    """The index versions one replica holds, oldest first, the live one last: the roll policy of
    both layouts. ``load(manifest, folder)`` builds the Scorer of one version."""

    def __init__(self, cfg: AppConfig, load):
        self.cfg, self.load = cfg, load
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

    async def current(self):
        """The live Scorer; starts a background check of the pointer when one is due."""
        if not self.held:
            try:
                await self.refresh()
            except Unavailable:
                raise
            except Exception as e:
                raise Unavailable(f"the index is not ready: {why(e)}", self.cfg.retry_after_s) from None
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


@serve.deployment(name="Model", max_ongoing_requests=64, max_queued_requests=256)
class Model:
    """One Scorer per held index version; ``shards`` (index-shard deployment handles) makes it the
    sharded layout's Model, whose searcher fans out to them."""

    def __init__(self, shards=None, **settings):
        # Nothing is loaded here: build_app always gives the deployment a user_config, which Serve
        # applies (reconfigure) before the replica takes requests.
        self.shards = list(shards or [])
        self.cfg = AppConfig.from_args(settings)
        self.versions = None
        self.cards = {}  # (checkpoint url, device, runtime) -> ModelCard, shared by the versions it built

    async def reconfigure(self, user_config: dict) -> None:
        cfg = AppConfig.from_args({**self.cfg.args(), **(user_config or {})}, source="Model user_config")
        reload = self.versions is None or any(getattr(cfg, k) != getattr(self.cfg, k) for k in _LOAD_KEYS)
        self.cfg = cfg
        self.score_batch.set_max_batch_size(cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
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
        held = {id(s.card) for s in (self.versions.held.values() if self.versions else [])} | {id(card)}
        self.cards = {u: c for u, c in self.cards.items() if id(c) in held}
        return scorer

    async def _versions(self) -> Versions:
        if self.versions is None:
            raise Unavailable("no model loaded yet (the deployment has no user_config)", self.cfg.retry_after_s)
        return self.versions

    # Two batches at once: one embeds (in a thread, off the event loop) while the other searches.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def score_batch(self, images: list, versions: list, maps: list) -> list:
        held = await self._versions()
        out = [None] * len(images)
        for v, want in dict.fromkeys(zip(versions, maps)):  # one version at a time: a batch never mixes two
            idx = [i for i, u in enumerate(zip(versions, maps)) if u == (v, want)]
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
        held = await self._versions()
        await held.current()
        res = list(await asyncio.gather(*(self.score_batch(im, version, bool(maps)) for im in images)))
        if any(r is GONE or r == GONE for r in res):
            return await self.card()
        return res

    async def card(self) -> dict:
        """The live version, its model card's preprocessing (what the Gateway decodes for) and
        whether it gives anomaly maps (it has a patch bank)."""
        live = await (await self._versions()).current()
        return {"version": live.version, "preprocess": live.preprocess.to_dict(), "maps": live.map_threshold is not None}

    async def info(self) -> dict:
        live = await (await self._versions()).current()
        return {**live.info(), "index_shard_groups": len(self.shards)}

    def check_health(self) -> None:
        if self.versions is None or (not self.shards and self.versions.live is None):
            raise RuntimeError("no model loaded: the Model deployment was started without a user_config")
