"""A sharded FAISS index of normal-set embeddings, its manifest, and search.

Layout (a folder or s3:// prefix):

    index/shard-0000.faiss ...   FAISS indexes over unit vectors, inner-product metric
    index/ids.parquet             row i = the sample id of global vector i (shards are successive)
    index/manifest.json           written last: dimension, metric, counts, k, model_id, threshold,
                                  creation time, sha256 of every file

A job that dies before the manifest leaves no manifest; ``load_index`` refuses files that do not
match their manifest (count, dimension, checksum, model id)."""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from msc_dist import storage

MANIFEST = "manifest.json"
FORMAT = "msc-index/1"


class IndexMismatch(ValueError):
    """The index files do not match their manifest, or the manifest does not match the model."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardEntry:
    file: str
    count: int
    sha256: str


@dataclass
class IndexManifest:
    dimension: int
    count: int
    shards: list[ShardEntry]
    ids_file: ShardEntry
    model_id: str
    k: int = 2
    metric: str = "inner_product"
    factory: str = "Flat"
    threshold: float | None = None
    target_fpr: float | None = None
    calibration_samples: int = 0
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # backbone, image size, checkpoint, ...
    format: str = FORMAT

    @classmethod
    def from_json(cls, d: dict) -> "IndexManifest":
        d = dict(d)
        d["shards"] = [ShardEntry(**s) for s in d["shards"]]
        d["ids_file"] = ShardEntry(**d["ids_file"])
        return cls(**d)


def _faiss():
    import faiss

    return faiss


def build_faiss(z: np.ndarray, factory: str = "Flat", seed: int = 0):
    """One FAISS index over (N, D) float32 unit vectors with the inner-product metric."""
    faiss = _faiss()
    d = z.shape[1]
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = z[rng.choice(len(z), size=min(len(z), 256 * 1024), replace=False)]
        index.train(np.ascontiguousarray(sample))
    index.add(np.ascontiguousarray(z))
    return index


def remove_manifest(out: str) -> None:
    """First step of every (re)build: without a manifest, nothing half-written looks whole."""
    man_url = storage.join(out, "index", MANIFEST)
    if storage.exists(man_url):
        storage.filesystem(man_url).rm(storage.strip_protocol(man_url) if storage.is_remote(man_url) else man_url)


def threshold_at_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The score that a fraction ``target_fpr`` of held-out normal samples exceed."""
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1.0 - target_fpr, method="higher"))


def write_index(out: str, z: np.ndarray, ids: list[str], model_id: str, *, num_shards: int = 1,
                factory: str = "Flat", k: int = 2, calibration: np.ndarray | None = None,
                target_fpr: float = 0.01, extra: dict | None = None) -> IndexManifest:
    """Write shards and ids, then the manifest last. An old manifest is removed first, so a crash
    part-way leaves no manifest rather than one that points at a mix of old and new files.
    ``calibration``: (M, D) held-out normal embeddings; the threshold is the score at
    ``target_fpr`` on them, searched in the index as built (approximate factories included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = _faiss()
    z = np.ascontiguousarray(z, dtype=np.float32)
    if z.ndim != 2 or len(ids) != z.shape[0]:
        raise ValueError(f"embeddings {z.shape} and {len(ids)} ids do not match")
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    folder = storage.join(out, "index")
    man_url = storage.join(folder, MANIFEST)
    remove_manifest(out)
    num_shards = max(1, min(num_shards, len(z)))
    bounds = np.linspace(0, len(z), num_shards + 1).astype(int)
    shards, built = [], []
    for i in range(num_shards):
        part = z[bounds[i]:bounds[i + 1]]
        built.append(build_faiss(part, factory))
        data = faiss.serialize_index(built[-1]).tobytes()
        name = f"shard-{i:04d}.faiss"
        storage.write_bytes_atomic(storage.join(folder, name), data)
        shards.append(ShardEntry(name, len(part), sha256(data)))
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), buf)
    ids_data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(folder, "ids.parquet"), ids_data)
    threshold = None
    if calibration is not None and len(calibration):
        sh = faiss.IndexShards(z.shape[1], True, True)
        for b in built:
            sh.add_shard(b)
        sims, _ = sh.search(np.ascontiguousarray(calibration, dtype=np.float32), k)
        threshold = threshold_at_fpr(np.maximum(2.0 - 2.0 * sims, 0.0).sum(1), target_fpr)
    man = IndexManifest(z.shape[1], len(z), shards, ShardEntry("ids.parquet", len(ids), sha256(ids_data)), model_id,
                        k=k, factory=factory, threshold=threshold, target_fpr=target_fpr if threshold is not None else None,
                        calibration_samples=0 if calibration is None else len(calibration), extra=extra or {})
    storage.write_bytes_atomic(man_url, json.dumps(asdict(man), indent=1).encode())
    return man


class ShardedIndex:
    """Loaded, verified index. ``search`` returns squared L2 distances (on unit vectors,
    2 - 2 cos) and global row numbers; ``ids[row]`` is the sample id."""

    def __init__(self, manifest: IndexManifest, index, ids: np.ndarray):
        self.manifest, self.index, self.ids = manifest, index, ids

    @property
    def count(self) -> int:
        return self.manifest.count

    def search(self, q: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = k or self.manifest.k
        sims, rows = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return np.maximum(2.0 - 2.0 * sims, 0.0).astype(np.float32), rows

    def score(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The paper's score, the sum of squared distances to the k nearest, plus the neighbours."""
        d, rows = self.search(q)
        return d.sum(axis=1), d, rows


def load_index(path: str, expected_model_id: str | None = None, use_gpu: bool = False) -> ShardedIndex:
    import pyarrow.parquet as pq

    faiss = _faiss()
    # Either the embedding job's --out (holding index/) or the index/ folder itself.
    folder = storage.join(path, "index")
    if not storage.exists(storage.join(folder, MANIFEST)) and storage.exists(storage.join(path, MANIFEST)):
        folder = path
    man_url = storage.join(folder, MANIFEST)
    if not storage.exists(man_url):
        raise IndexMismatch(f"no {MANIFEST} in {folder}: the index is missing or its job did not finish")
    man = IndexManifest.from_json(json.loads(storage.read_bytes(man_url)))
    if man.format != FORMAT:
        raise IndexMismatch(f"{man_url}: unknown format {man.format!r} (expected {FORMAT!r})")
    if expected_model_id is not None and man.model_id != expected_model_id:
        raise IndexMismatch(
            f"index model_id {man.model_id[:12]}… does not match the checkpoint's {expected_model_id[:12]}…: "
            "the index was built with another model; rebuild it with python -m msc_dist.embed"
        )

    def _read(entry: ShardEntry) -> bytes:
        url = storage.join(folder, entry.file)
        if not storage.exists(url):
            raise IndexMismatch(f"{url} is listed in the manifest but missing")
        data = storage.read_bytes(url)
        if sha256(data) != entry.sha256:
            raise IndexMismatch(f"{url}: checksum does not match the manifest (file changed or partial)")
        return data

    shards = faiss.IndexShards(man.dimension, True, True)  # threaded, successive ids
    subs = []
    for e in man.shards:
        sub = faiss.deserialize_index(np.frombuffer(_read(e), dtype=np.uint8))
        if sub.d != man.dimension or sub.ntotal != e.count:
            raise IndexMismatch(f"{e.file}: count/dimension mismatch: the file holds {sub.ntotal} vectors of dimension "
                                f"{sub.d}, the manifest says {e.count} x {man.dimension}")
        subs.append(sub)
        shards.add_shard(sub)
    ids = pq.read_table(io.BytesIO(_read(man.ids_file)))["id"].to_numpy(zero_copy_only=False)
    if len(ids) != man.count or sum(e.count for e in man.shards) != man.count:
        raise IndexMismatch(f"manifest count {man.count} does not match shards / ids ({len(ids)})")
    index = shards
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True
        cpu_flat = faiss.IndexFlatIP(man.dimension) if man.factory == "Flat" else None
        if cpu_flat is not None:
            # A flat copy cloned across all GPUs, sharded, is the fastest exact search there.
            for s in subs:
                cpu_flat.add(s.reconstruct_n(0, s.ntotal))
            index = faiss.index_cpu_to_all_gpus(cpu_flat, co)
        else:
            index = faiss.index_cpu_to_all_gpus(shards, co)
    out = ShardedIndex(man, index, ids)
    out._subs = subs  # IndexShards does not own its sub-indexes: keep them alive with it
    return out
