"""Building an index version: FAISS shards from vectors or from the embedding job's Parquet
parts, their files, and the threshold from calibration distances.

Every shard is built by its own function call from its own rows (``build_shard_from_parts``):
the embedding job runs those as parallel Ray tasks; ``write_index`` runs them in-process for
vectors already in memory. Trained factories (IVF, PQ) are trained once on a seeded sample and
the trained empty index is handed to every shard. The threshold comes from calibration
vectors searched in each shard and merged: exactly the search of the whole index."""

from __future__ import annotations

from dataclasses import asdict
from typing import Iterator

import numpy as np

from msc_dist import storage
from msc_dist.index.versions import IndexManifest, ShardEntry, new_version, publish, version_root
from msc_dist.scoring import squared_distances

MAX_TRAIN_ROWS = 256 * 1024


def needs_training(factory: str, d: int = 8) -> bool:
    import faiss

    return not faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT).is_trained


def train_empty(sample: np.ndarray, factory: str) -> bytes | None:
    """The trained, empty index for ``factory`` (None when it needs no training), serialised so
    that every shard task starts from the same one."""
    import faiss

    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return None
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def seeded_sample(z: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if len(z) <= n:
        return z
    return z[np.sort(np.random.default_rng(seed).choice(len(z), size=n, replace=False))]


def _new_index(d: int, factory: str, trained: bytes | None):
    import faiss

    if trained is not None:
        return faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        raise ValueError(f"factory {factory!r} needs training: pass the trained empty index")
    return index


def write_shard(root: str, shard_no: int, index, ids: list[str], folder: str = "index") -> ShardEntry:
    """A shard's files under the version folder ``root``: ``FOLDER/shard-NNNN.faiss`` and the id of
    each of its rows (``.ids.parquet``; folder ``index``: the image index, ``bank``: the patch
    bank, whose rows are patches and whose ids are their images'). Names in the entry are relative
    to ``root``."""
    import faiss
    import pyarrow as pa

    name = f"{folder}/shard-{shard_no:04d}"
    data = faiss.serialize_index(index).tobytes()
    storage.write_bytes_atomic(storage.join(root, name + ".faiss"), data)
    ids_sha = storage.write_table(storage.join(root, name + ".ids.parquet"), pa.table({"id": pa.array(ids, pa.string())}))
    return ShardEntry(name + ".faiss", int(index.ntotal), storage.sha256(data), name + ".ids.parquet", ids_sha)


def calibration_distances(index, cal: np.ndarray | None, k: int) -> np.ndarray:
    """(M, k) squared distances from each calibration vector to its k nearest in this shard
    (inf where the shard holds fewer than k)."""
    if cal is None or len(cal) == 0:
        return np.zeros((0, k), np.float32)
    sims, rows = index.search(np.ascontiguousarray(cal, dtype=np.float32), k)
    d = squared_distances(sims)
    d[rows < 0] = np.inf
    return d


def merged_scores(per_shard: list[np.ndarray], k: int) -> np.ndarray:
    """Per-shard (M, k) distances -> the global score: the sum of the k smallest over all shards,
    exactly what one search of the whole index gives."""
    d = np.sort(np.concatenate(per_shard, axis=1), axis=1)[:, :k]
    return d.sum(axis=1)


def threshold_at_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The score that a fraction ``target_fpr`` of held-out normal samples exceed."""
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1.0 - target_fpr, method="higher"))


def threshold_from_shards(per_shard: list[np.ndarray], k: int, target_fpr: float) -> float | None:
    if not per_shard or per_shard[0].shape[0] == 0:
        return None
    return threshold_at_fpr(merged_scores(per_shard, k), target_fpr)


# --- Building from the embedding job's Parquet parts (one call per shard, in workers) --------

def iter_parts(urls: list[str], batch_rows: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, (n, D) float32) batches from Parquet parts, streamed: a task's memory holds one batch
    beside what it builds."""
    import pyarrow.parquet as pq

    for url in urls:
        with storage.open_file(url, "rb") as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=["id", "embedding"]):
                emb = rb.column(1)
                d = emb.type.list_size
                z = emb.values.to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)
                yield rb.column(0).to_pylist(), z


def read_vectors(urls: list[str], max_rows: int | None = None) -> tuple[list[str], np.ndarray]:
    ids, zs, n = [], [], 0
    for i, z in iter_parts(urls):
        ids += i
        zs.append(z)
        n += len(i)
        if max_rows is not None and n >= max_rows:
            break
    if not zs:
        return [], np.zeros((0, 0), np.float32)
    return ids, np.concatenate(zs)


def train_from_parts(urls: list[str], factory: str, seed: int = 0, max_rows: int = MAX_TRAIN_ROWS) -> bytes | None:
    """Train the empty index once, on up to ``max_rows`` rows of ``urls`` (the caller picks a
    seeded subset of whole parts: one read of those parts, no pass over the rest)."""
    _, z = read_vectors(urls, max_rows=max_rows)
    return train_empty(seeded_sample(z, max_rows, seed), factory)


def build_shard_from_parts(root: str, shard_no: int, part_urls: list[str], cal_urls: list[str],
                           factory: str, trained: bytes | None, k: int) -> dict:
    """Build, write and calibrate one index shard from its Parquet parts. Returns its manifest
    entry and the (M, k) distances of the calibration vectors to its nearest members."""
    index, ids = None, []
    for batch_ids, z in iter_parts(part_urls):
        if index is None:
            index = _new_index(z.shape[1], factory, trained)
        index.add(np.ascontiguousarray(z))
        ids += batch_ids
    if index is None:
        raise ValueError(f"index shard {shard_no} has no rows (parts: {part_urls[:3]}...)")
    entry = write_shard(root, shard_no, index, ids)
    cal = [calibration_distances(index, z, k) for _, z in iter_parts(cal_urls)]
    return {"entry": asdict(entry), "cal": np.concatenate(cal) if cal else np.zeros((0, k), np.float32)}


def assign_parts(parts: list[tuple[str, int]], num_shards: int) -> list[list[str]]:
    """Parts (url, rows) in order -> contiguous groups of about equal row counts, one per shard."""
    total = sum(n for _, n in parts)
    num_shards = max(1, min(num_shards, len([p for p in parts if p[1] > 0])))
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    seen = 0
    for url, n in parts:
        if n == 0:
            continue
        g = min(num_shards - 1, int(seen * num_shards / max(total, 1)))
        groups[g].append(url)
        seen += n
    return [g for g in groups if g]


def write_index(out: str, z: np.ndarray, ids: list[str], model_id: str, *, num_shards: int = 1,
                factory: str = "Flat", k: int = 2, calibration: np.ndarray | None = None,
                target_fpr: float = 0.01, extra: dict | None = None, seed: int = 0) -> IndexManifest:
    """In-process build of vectors already in memory (tests, benchmarks, small sets), with the
    same shard, calibration and publishing steps as the embedding job's parallel build."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    if z.ndim != 2 or len(ids) != z.shape[0]:
        raise ValueError(f"embeddings {z.shape} and {len(ids)} ids do not match")
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    version = new_version()
    trained = train_empty(seeded_sample(z, MAX_TRAIN_ROWS, seed), factory) if needs_training(factory) else None
    num_shards = max(1, min(num_shards, len(z)))
    bounds = np.linspace(0, len(z), num_shards + 1).astype(int)
    shards, cal = [], []
    for i in range(num_shards):
        index = _new_index(z.shape[1], factory, trained)
        index.add(z[bounds[i]:bounds[i + 1]])
        shards.append(write_shard(version_root(out, version), i, index, list(ids[bounds[i]:bounds[i + 1]])))
        cal.append(calibration_distances(index, calibration, k))
    threshold = threshold_from_shards(cal, k, target_fpr) if calibration is not None and len(calibration) else None
    man = IndexManifest(z.shape[1], len(z), shards, model_id, version=version, k=k, factory=factory,
                        threshold=threshold, target_fpr=target_fpr if threshold is not None else None,
                        calibration_samples=0 if calibration is None else len(calibration), extra=extra or {})
    publish(out, man)
    return man



# --- The patch bank (msc_dist.patches): one bank shard per index shard, from the same parts ----

PATCH_COLUMN = "patches"


def iter_patch_parts(urls: list[str], dim: int, batch_rows: int = 1024) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, (n, m, dim) float32) batches of the ``patches`` column of Parquet parts, streamed."""
    import pyarrow.parquet as pq

    for url in urls:
        with storage.open_file(url, "rb") as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=["id", PATCH_COLUMN]):
                col = rb.column(1)
                z = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                yield rb.column(0).to_pylist(), z.reshape(len(rb), -1, dim)


def build_bank_shard_from_parts(root: str, shard_no: int, part_urls: list[str], cal_urls: list[str], dim: int) -> dict:
    """Build, write and calibrate one bank shard from the bank rows of its Parquet parts (each
    image's selected patches, chosen by the part writer). Returns its manifest entry and the
    (M, h*w) squared distances of the calibration images' patches to their nearest in it."""
    from msc_dist.patches import nearest, new_bank_index

    index, ids = new_bank_index(dim), []
    for batch_ids, p in iter_patch_parts(part_urls, dim):
        index.add(np.ascontiguousarray(p.reshape(-1, dim)))
        ids += [i for i in batch_ids for _ in range(p.shape[1])]
    entry = write_shard(root, shard_no, index, ids, folder="bank")
    cal = [nearest(index, p) for _, p in iter_patch_parts(cal_urls, dim)]
    return {"entry": asdict(entry), "cal": np.concatenate(cal) if cal else np.zeros((0, 0), np.float32)}


def patch_thresholds(global_cal: list[np.ndarray], bank_cal: list[np.ndarray], k: int, target_fpr: float,
                     grid: tuple[int, int], size: int, sigma: float) -> dict | None:
    """The calibrated thresholds of the three score modes from the per-shard calibration distances
    (merged exactly: k smallest / the minimum over shards). ``map_threshold`` = the patch score's
    threshold: a pixel counts as defective above the value that a fraction ``target_fpr`` of
    normal images' map maxima exceed, so a normal image has no region at that rate."""
    from msc_dist.patches import anomaly_map, combined_scores, patch_scores

    if not bank_cal or bank_cal[0].shape[0] == 0:
        return None
    g = merged_scores(global_cal, k)
    d = np.minimum.reduce(bank_cal).reshape(-1, *grid)
    ps = np.concatenate([patch_scores(anomaly_map(d[s:s + 256], size, sigma)) for s in range(0, len(d), 256)])
    tg, tp = threshold_at_fpr(g, target_fpr), threshold_at_fpr(ps, target_fpr)
    tg, tp = max(tg, 1e-12), max(tp, 1e-12)
    tc = threshold_at_fpr(combined_scores(g, ps, tg, tp), target_fpr)
    return {"global": tg, "patch": tp, "combined": tc, "map_threshold": tp}
