"""Serving an index larger than one replica: index-shard deployments and an exact scatter-gather.

    Gateway  ->  Model (card only: decode once, embed a batch once)  ->  IndexShard-0 .. IndexShard-{N-1}

``build_app({"index_shards": N, ...})`` (serving/app.py) builds this layout; 0, the default, is
the single Model that holds the whole index. Both use the same Model deployment and the same
Scorer (serving/model.py); here its searcher is a ``FanOutSearcher``. Deployment ``IndexShard-g``
serves the manifest shards i with i % N == g of an index version (checksums checked at load, the
model id before any answer, on a GPU when the replica has one) and scales on its own load. The
Model sends each batch of query vectors to every shard group concurrently and merges their top-k
into the global top-k: the same scores and neighbours as one search of the unsharded index
(``msc_dist.index.merged_scores``). A version with a patch bank has one bank shard per index
shard; each group searches the bank shards of its index shards, and the Model takes per patch the
minimum of the groups' nearest distances (``merge_patch_answers``): the same anomaly maps as the
single layout.

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

import numpy as np
from ray import serve

from msc_dist.storage import expand
from serving.errors import Unavailable, why

log = logging.getLogger("msc_dist.serving.sharded")


class ShardUnavailable(Unavailable):
    """No complete answer from the index shards of one version (503 + Retry-After)."""


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

        self.index, self.device, self.keep = expand(index), device, max(1, int(keep_versions))
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
            raise ShardUnavailable(f"index shard group {self.group} has not loaded version {version} yet")
        self._checked(idx, version, model_id)
        d, rows = await asyncio.to_thread(idx.search, q, k)
        ids = idx.ids[np.maximum(rows, 0)].astype(object)
        ids[rows < 0] = None
        return {"group": self.group, "version": version, "shards": list(idx.shard_numbers), "d": d, "ids": ids}

    async def search_patches(self, p: np.ndarray, version: str, model_id: str) -> dict:
        """(B, n) squared distances of the patches ``p`` (B, n, C) to their nearest patch in this
        group's patch-bank shards of ``version`` (the bank shard of each index shard it serves)."""
        idx = self.versions.get(version)
        if idx is None:
            asyncio.ensure_future(self._ensure(version, model_id)).add_done_callback(
                lambda t: t.cancelled() or t.exception())
            raise ShardUnavailable(f"index shard group {self.group} has not loaded version {version} yet")
        self._checked(idx, version, model_id)
        d = await asyncio.to_thread(idx.search_patches, p)
        return {"group": self.group, "version": version, "shards": list(idx.shard_numbers), "d": d}

    def versions_loaded(self) -> list[str]:
        return list(self.versions)


def merge_answers(answers: list[dict], k: int, version: str, num_shards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group top-k -> (scores, distances, ids) of the global top-k, exactly one search of the
    whole index. Refuses (ShardUnavailable) answers of another version or that do not cover
    every shard exactly once."""
    from msc_dist.index import merged_scores

    answers = _complete(answers, version, num_shards)
    d = np.concatenate([a["d"] for a in answers], axis=1)
    ids = np.concatenate([a["ids"] for a in answers], axis=1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return (merged_scores([a["d"] for a in answers], k), np.take_along_axis(d, order, axis=1),
            np.take_along_axis(ids, order, axis=1))


def _complete(answers: list[dict], version: str, num_shards: int) -> list[dict]:
    """The answers of one version that cover every shard exactly once, in shard order; else
    ShardUnavailable (a roll under way, a group missing): never a partial merge."""
    got = sorted({a["version"] for a in answers})
    if got != [version]:
        raise ShardUnavailable(f"index shards answered for versions {got}, not {version} alone (a roll is under way)")
    covered = sorted(s for a in answers for s in a["shards"])
    if covered != list(range(num_shards)):
        raise ShardUnavailable(f"index shards {covered} answered, not all {num_shards} of version {version}")
    return sorted(answers, key=lambda a: min(a["shards"]))


def merge_patch_answers(answers: list[dict], version: str, num_shards: int) -> np.ndarray:
    """Per-group nearest-bank distances -> (B, n): per patch the minimum over the groups, exactly
    one search of the whole patch bank (as ``merge_answers`` is for the image index)."""
    return np.minimum.reduce([a["d"] for a in _complete(answers, version, num_shards)])


class FanOutSearcher:
    """The searcher of the sharded layout's Scorer: one index version searched on every
    index-shard group at once, merged exactly (``merge_answers``)."""

    def __init__(self, shards: list, manifest, cfg):
        self.shards, self.manifest, self.cfg = list(shards), manifest, cfg

    async def _fan(self, method: str, *args, timeout: float) -> list:
        calls = [getattr(h, method).remote(*args) for h in self.shards]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*calls), timeout))
        except asyncio.TimeoutError:
            reason = f"an index shard did not answer within {timeout:g}s"
        except Exception as e:  # a dead replica, a shard that refused: no partial answer
            reason = f"an index shard failed: {why(e)}"
        for c in calls:
            c.cancel()
        raise ShardUnavailable(reason, float(self.cfg.retry_after_s))

    async def prepare(self) -> None:
        """Every shard group loads this version (if not yet); together they cover every shard."""
        from msc_dist.index import IndexMismatch

        man = self.manifest
        answers = await self._fan("prepare", man.version, man.model_id, timeout=self.cfg.shard_load_timeout_s)
        covered = sorted(s for a in answers for s in a["shards"])
        if covered != list(range(len(man.shards))):
            raise IndexMismatch(f"index shard groups cover shards {covered} of {len(man.shards)}")

    async def asearch(self, z: np.ndarray):
        man = self.manifest
        answers = await self._fan("search", z, man.k, man.version, man.model_id, timeout=self.cfg.shard_timeout_s)
        return merge_answers(answers, man.k, man.version, len(man.shards))

    async def asearch_patches(self, p: np.ndarray) -> np.ndarray:
        """(B, n, C) patches -> (B, n) squared distances to the nearest patch of the whole bank."""
        man = self.manifest
        answers = await self._fan("search_patches", p, man.version, man.model_id, timeout=self.cfg.shard_timeout_s)
        return merge_patch_answers(answers, man.version, len(man.shards))

    def search(self, z: np.ndarray):
        raise TypeError("the sharded searcher fans out over the network: use Scorer.ascore_embeddings")
