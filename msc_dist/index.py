"""A sharded FAISS index of normal-set embeddings, published as versions, and its search.

Layout (a folder or s3:// prefix, the embedding job's --out):

    current.json                               the pointer: which version is live (written last)
    versions/<id>/manifest.json                dimension, metric, counts, k, model id, threshold,
                                               sha256 of every file of the version
    versions/<id>/index/shard-0000.faiss       FAISS indexes over unit vectors, inner-product metric
    versions/<id>/index/shard-0000.ids.parquet row i = the sample id of that shard's vector i
    versions/<id>/embeddings/part-*.parquet    the embedding rows (cal-*: the calibration hold-out)

A (re)build writes a new version folder beside the live one and publishes it by replacing the
small pointer file: a job that dies part-way leaves the previous version live and loadable.
``keep_versions`` published versions are kept (the live one and the one before it by default);
older ones and unpublished leftovers of killed runs are deleted after publishing. Readers follow
the pointer, or pin a version by loading its folder. ``load_index`` refuses files that do not
match their manifest (count, dimension, checksum, model id).

Every shard is built by its own function call from its own rows (``build_shard_from_parts``):
the embedding job runs those as parallel Ray tasks; ``write_index`` runs them in-process for
vectors already in memory. Trained factories (IVF, PQ) are trained once on a seeded sample and
the trained empty index is handed to every shard. The threshold comes from calibration
vectors searched in each shard and merged: exactly the search of the whole index."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from msc_dist import storage
from msc_dist.scoring import knn_from_similarities, squared_distances

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "current.json"
FORMAT = "msc-index/2"
MAX_TRAIN_ROWS = 256 * 1024


class IndexMismatch(ValueError):
    """The index files do not match their manifest, or the manifest does not match the model."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardEntry:
    file: str  # relative to index/, e.g. "<version>/shard-0000.faiss"
    count: int
    sha256: str
    ids_file: str = ""
    ids_sha256: str = ""


@dataclass
class IndexManifest:
    dimension: int
    count: int
    shards: list[ShardEntry]
    model_id: str
    version: str = ""
    k: int = 2
    metric: str = "inner_product"
    factory: str = "Flat"
    threshold: float | None = None
    target_fpr: float | None = None
    calibration_samples: int = 0
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # backbone, image size, checkpoint, embeddings files, ...
    format: str = FORMAT

    @classmethod
    def from_json(cls, d: dict) -> "IndexManifest":
        d = dict(d)
        if d.get("format") != FORMAT:
            raise IndexMismatch(f"unknown index format {d.get('format')!r} (expected {FORMAT!r}): rebuild the index "
                                "with python -m msc_dist.embed")
        d["shards"] = [ShardEntry(**s) for s in d["shards"]]
        return cls(**d)


def new_version() -> str:
    """Names sort in creation order (to the microsecond, UTC), which publishing relies on to tell
    older leftovers from a newer rebuild still running."""
    from datetime import datetime, timezone

    return f"v-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}-{uuid.uuid4().hex[:4]}"


def version_root(out: str, version: str) -> str:
    return storage.join(out, "versions", version)


def _faiss():
    import faiss

    return faiss


def needs_training(factory: str, d: int = 8) -> bool:
    faiss = _faiss()
    return not faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT).is_trained


def train_empty(sample: np.ndarray, factory: str) -> bytes | None:
    """The trained, empty index for ``factory`` (None when it needs no training), serialised so
    that every shard task starts from the same one."""
    faiss = _faiss()
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
    faiss = _faiss()
    if trained is not None:
        return faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        raise ValueError(f"factory {factory!r} needs training: pass the trained empty index")
    return index


def _write_table(url: str, table) -> str:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    storage.write_bytes_atomic(url, data)
    return sha256(data)


def _write_shard(root: str, shard_no: int, index, ids: list[str]) -> ShardEntry:
    """Shard files under the version folder ``root``; names in the entry are relative to it."""
    import pyarrow as pa

    faiss = _faiss()
    name = f"index/shard-{shard_no:04d}"
    data = faiss.serialize_index(index).tobytes()
    storage.write_bytes_atomic(storage.join(root, name + ".faiss"), data)
    ids_sha = _write_table(storage.join(root, name + ".ids.parquet"), pa.table({"id": pa.array(ids, pa.string())}))
    return ShardEntry(name + ".faiss", int(index.ntotal), sha256(data), name + ".ids.parquet", ids_sha)


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
    entry = _write_shard(root, shard_no, index, ids)
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


# --- Publishing ---------------------------------------------------------------------------------

def read_pointer(out: str) -> dict | None:
    url = storage.join(out, POINTER)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def publish(out: str, man: IndexManifest, keep_versions: int = 2) -> None:
    """Make ``man`` (its files already under versions/<id>/) the live version: its manifest, then
    the pointer in one atomic write. Then delete what nothing needs: published versions beyond
    the newest ``keep_versions`` and unpublished leftovers older than this one (a rebuild that
    started later and is still running is newer, and stays)."""
    from msc_dist.data.shards import safe_name

    safe_name(man.version, "index version")
    root = version_root(out, man.version)
    data = json.dumps(asdict(man), indent=1).encode()
    storage.write_bytes_atomic(storage.join(root, MANIFEST), data)
    pointer = {"format": "msc-index-pointer/1", "version": man.version, "manifest_sha256": sha256(data),
               "published": time.time()}
    storage.write_bytes_atomic(storage.join(out, POINTER), json.dumps(pointer, indent=1).encode())
    base = storage.join(out, "versions")
    fs = storage.filesystem(base)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(storage.path_of(base), detail=False))
    published = [n for n in names if n != man.version and storage.exists(storage.join(base, n, MANIFEST))]
    keep = {man.version, *published[::-1][:max(0, keep_versions - 1)]}
    for n in names:
        if n not in keep and (n in published or n < man.version):
            log.info("deleting index version %s", n)
            fs.rm(storage.path_of(storage.join(base, n)), recursive=True)


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
        shards.append(_write_shard(version_root(out, version), i, index, list(ids[bounds[i]:bounds[i + 1]])))
        cal.append(calibration_distances(index, calibration, k))
    threshold = threshold_from_shards(cal, k, target_fpr) if calibration is not None and len(calibration) else None
    man = IndexManifest(z.shape[1], len(z), shards, model_id, version=version, k=k, factory=factory,
                        threshold=threshold, target_fpr=target_fpr if threshold is not None else None,
                        calibration_samples=0 if calibration is None else len(calibration), extra=extra or {})
    publish(out, man)
    return man


# --- Loading and search -------------------------------------------------------------------------

class ShardedIndex:
    """Loaded, verified index. ``search`` returns squared L2 distances (on unit vectors,
    2 - 2 cos) and global row numbers; ``ids[row]`` is the sample id."""

    def __init__(self, manifest: IndexManifest, index, ids: np.ndarray, root: str = ""):
        self.manifest, self.index, self.ids, self.root = manifest, index, ids, root  # root: the version folder

    @property
    def count(self) -> int:
        return self.manifest.count

    def search(self, q: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = k or self.manifest.k
        sims, rows = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return squared_distances(sims), rows

    def score(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The paper's score, the sum of squared distances to the k nearest, plus the neighbours."""
        sims, rows = self.index.search(np.ascontiguousarray(q, dtype=np.float32), self.manifest.k)
        score, d = knn_from_similarities(sims)  # the one kNN formula: training's evaluation uses it too
        return score, d, rows


def resolve_version(path: str) -> str:
    """The version folder to load: the one ``current.json`` points at, or ``path`` itself when it
    is a version folder (a pinned version)."""
    if storage.exists(storage.join(path, MANIFEST)):
        return path
    pointer = read_pointer(path)
    if pointer is None:
        raise IndexMismatch(f"no {POINTER} (nor {MANIFEST}) in {path}: the index is missing or its job did not finish")
    from msc_dist.data.shards import DataError, safe_name

    try:
        return version_root(path, safe_name(pointer["version"], storage.join(path, POINTER)))
    except DataError as e:
        raise IndexMismatch(str(e)) from None


def read_manifest(path: str) -> tuple[IndexManifest, str]:
    """(manifest, version folder) of the live (or pinned) version, checked against the pointer."""
    root = resolve_version(path)
    url = storage.join(root, MANIFEST)
    if not storage.exists(url):
        raise IndexMismatch(f"{url} is missing: the pointer names a version that is not there")
    data = storage.read_bytes(url)
    pointer = read_pointer(path) if root != path else None
    if pointer is not None and pointer.get("manifest_sha256") not in (None, sha256(data)):
        raise IndexMismatch(f"{url}: checksum does not match {POINTER}")
    return IndexManifest.from_json(json.loads(data)), root


def load_index(path: str, expected_model_id: str | None = None, use_gpu: bool = False) -> ShardedIndex:
    """The live (or pinned) version with every shard, verified (checksums, counts, dimension,
    model id): ``load_shards`` of all its shards."""
    man, _ = read_manifest(path)
    if sum(e.count for e in man.shards) != man.count:
        raise IndexMismatch(f"manifest count {man.count} does not match its shards ({sum(e.count for e in man.shards)})")
    return load_shards(path, None, expected_model_id, use_gpu)


def _load_subs(man: IndexManifest, folder: str, numbers: list[int]) -> tuple[list, list]:
    """(FAISS sub-indexes, their id arrays) of shards ``numbers``, each checked against the manifest."""
    import pyarrow.parquet as pq

    faiss = _faiss()
    subs, ids = [], []
    for i in numbers:
        e = man.shards[i]
        sub = faiss.deserialize_index(np.frombuffer(_read_checked(folder, e.file, e.sha256), dtype=np.uint8))
        if sub.d != man.dimension or sub.ntotal != e.count:
            raise IndexMismatch(f"{e.file}: count/dimension mismatch: the file holds {sub.ntotal} vectors of dimension "
                                f"{sub.d}, the manifest says {e.count} x {man.dimension}")
        sub_ids = pq.read_table(io.BytesIO(_read_checked(folder, e.ids_file, e.ids_sha256)))["id"]
        sub_ids = sub_ids.to_numpy(zero_copy_only=False)
        if len(sub_ids) != e.count:
            raise IndexMismatch(f"{e.ids_file}: {len(sub_ids)} ids for {e.count} vectors")
        subs.append(sub)
        ids.append(sub_ids)
    return subs, ids


# --- One group of shards, and the GPU placement (serving an index spread over replicas) --------

def _read_checked(folder: str, name: str, digest: str) -> bytes:
    """A file of a version folder, checked against its manifest digest (names stay inside it)."""
    from msc_dist.data.shards import DataError, safe_name

    try:
        url = storage.join(folder, safe_name(name, storage.join(folder, MANIFEST)))
    except DataError as e:
        raise IndexMismatch(str(e)) from None
    if not storage.exists(url):
        raise IndexMismatch(f"{url} is listed in the manifest but missing")
    data = storage.read_bytes(url)
    if sha256(data) != digest:
        raise IndexMismatch(f"{url}: checksum does not match the manifest (file changed or partial)")
    return data


def shard_group(num_shards: int, group: int, groups: int) -> list[int]:
    """The manifest shards that index-shard deployment ``group`` of ``groups`` serves: i % groups
    == group, so an index built with 16 shards can be served by 4 deployments."""
    return [i for i in range(num_shards) if i % groups == group]


def load_shards(path: str, shards: list[int] | None = None, expected_model_id: str | None = None,
                use_gpu: bool = False, version: str | None = None) -> ShardedIndex:
    """Some shards of one index version, each verified (checksums, counts, dimension, model id). ``path``: the index root (``version`` None: the version the pointer
    names) or a version folder. The result searches only these shards; row numbers index its
    ``ids`` (``.shard_numbers`` says which shards they are)."""
    if version is not None and not storage.exists(storage.join(path, MANIFEST)):
        from msc_dist.data.shards import DataError, safe_name

        try:
            path = version_root(path, safe_name(version, "index version"))
        except DataError as e:
            raise IndexMismatch(str(e)) from None
    man, folder = read_manifest(path)
    if version is not None and man.version != version:
        raise IndexMismatch(f"{folder} holds version {man.version}, not {version}")
    if expected_model_id is not None and man.model_id != expected_model_id:
        raise IndexMismatch(
            f"index model_id {man.model_id[:12]}… does not match the checkpoint's {expected_model_id[:12]}…: "
            "the index was built with another model; rebuild it with python -m msc_dist.embed")
    numbers = list(range(len(man.shards))) if shards is None else sorted(shards)
    if not numbers or numbers[0] < 0 or numbers[-1] >= len(man.shards):
        raise IndexMismatch(f"shards {numbers} asked of a version with {len(man.shards)} shards")
    subs, ids = _load_subs(man, folder, numbers)
    index, keep = place_subs(man, subs, use_gpu)
    out = ShardedIndex(man, index, np.concatenate(ids), folder)
    out._subs, out._gpu = subs, keep
    out.shard_numbers = numbers
    return out


def _cpu_shards(d: int, subs: list):
    faiss = _faiss()
    shards = faiss.IndexShards(d, True, True)  # threaded, successive ids
    for s in subs:
        shards.add_shard(s)
    return shards


def clone_subs(d: int, subs: list, clone) -> tuple[object, list]:
    """An ``IndexShards`` over ``clone(i, sub)`` of every sub-index (the clone of each sub-index,
    never of a wrapper: FAISS has no GPU clone of ``IndexShards``). A sub-index that ``clone``
    cannot place (a type with no GPU version) stays as it is, with a warning."""
    placed = []
    for i, s in enumerate(subs):
        try:
            placed.append(clone(i, s))
        except RuntimeError as e:
            log.warning("index shard %d (%s) stays on the CPU: %s", i, type(s).__name__, str(e).splitlines()[0])
            placed.append(s)
    return _cpu_shards(d, placed), placed


def place_subs(man: IndexManifest, subs: list, use_gpu: bool) -> tuple[object, object]:
    """(searchable index, objects to keep alive with it). On the CPU: ``IndexShards`` over the
    sub-indexes. With ``use_gpu`` and CUDA: a Flat index becomes one ``ExactTwoStage`` over all
    its vectors (exact, float32 results, needs only torch); other factories are cloned to the
    GPUs sub-index by sub-index when a FAISS GPU build is installed (else they stay on the CPU)."""
    if not use_gpu:
        return _cpu_shards(man.dimension, subs), None
    import torch

    if man.factory == "Flat" and torch.cuda.is_available():
        z = np.concatenate([s.reconstruct_n(0, s.ntotal) for s in subs])
        return ExactTwoStage(z, device="cuda"), None
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        log.warning("use_gpu: no FAISS GPU build or no GPU visible (install the 'gpu' extra); searching on the CPU")
        return _cpu_shards(man.dimension, subs), None
    ngpu = faiss.get_num_gpus()
    res = [faiss.StandardGpuResources() for _ in range(ngpu)]
    index, placed = clone_subs(man.dimension, subs, lambda i, s: faiss.index_cpu_to_gpu(res[i % ngpu], i % ngpu, s))
    return index, (res, placed)


def _low_precision_error(dtype, d: int) -> float:
    """A bound on |approximate - exact| inner product of two vectors of norm <= 1, when both are
    rounded to ``dtype`` (unit roundoff u), multiplied with float32 accumulation and the result
    rounded to ``dtype``: 2u + u^2 for the inputs, u for the output, d * 2^-24 for the sum; times
    2 for safety (accumulation order and fused steps differ between kernels)."""
    import torch

    u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    return 2.0 * (3 * u + 2 * u * u + d * 2.0 ** -24)


class ExactTwoStage:
    """Exact top-k by inner product with a low-precision first pass, for unit vectors.

    1. A float16 (bfloat16 on the CPU) matmul of the queries with the whole bank and a top-(c+1):
       c candidates per query and b, the best approximate score left out.
    2. An exact float32 re-rank of the c candidates (products summed elementwise in float32, no
       TF32) and their top-k.
    3. Certification: every approximate score is within ``eps`` of the exact one
       (``_low_precision_error``), so a vector left out has an exact score <= b + eps. Where the
       k-th exact score among the candidates is above b + eps the answer is exact; every other
       query is searched again exactly in float32 over the whole bank.

    ``search`` has the FAISS signature: (sims float32, rows int64) as NumPy arrays, best first.
    ``stats`` counts queries and the ones that took the float32 path."""

    def __init__(self, vectors: np.ndarray, device: str = "cuda", dtype=None, candidates: int = 32,
                 max_scores_bytes: int = 4 << 30):
        import torch

        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.bfloat16)
        if self.device.type == "cuda":  # the error bound assumes float32 accumulation in the low-precision matmul
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
        self.ntotal, self.d = int(x.shape[0]), int(x.shape[1])
        self.max_norm = float(x.norm(dim=1).max()) if self.ntotal else 0.0
        self.x32 = x
        self.xlo = x.to(self.dtype)
        self.candidates = candidates
        self.max_scores_bytes = max_scores_bytes
        self.stats = {"queries": 0, "exact_fallback": 0}

    def _exact_full(self, q):
        import torch

        old = torch.get_float32_matmul_precision()
        if old == "highest":
            return q @ self.x32.T
        torch.set_float32_matmul_precision("highest")  # no TF32
        try:
            return q @ self.x32.T
        finally:
            torch.set_float32_matmul_precision(old)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = np.ascontiguousarray(q, dtype=np.float32)
        m = q.shape[0]
        sims = np.full((m, k), -np.inf, np.float32)
        rows = np.full((m, k), -1, np.int64)
        if m == 0 or self.ntotal == 0:
            return sims, rows
        kk = min(k, self.ntotal)
        c = min(max(self.candidates, kk), self.ntotal)
        chunk = max(1, min(4096, self.max_scores_bytes // max(1, 2 * self.ntotal)))  # (chunk, N) low-precision scores
        with torch.no_grad():
            for s in range(0, m, chunk):
                qt = torch.from_numpy(q[s:s + chunk]).to(self.device)
                if c == self.ntotal:  # the bank is no larger than the candidate list: all exact
                    top, idx = torch.topk(self._exact_full(qt), kk, dim=1)
                    sims[s:s + len(qt), :kk], rows[s:s + len(qt), :kk] = top.cpu().numpy(), idx.cpu().numpy()
                    continue
                approx = qt.to(self.dtype) @ self.xlo.T  # (B, N) low precision
                av, ai = torch.topk(approx, c + 1, dim=1)
                b = av[:, c].float()  # the best approximate score left out
                cand = ai[:, :c]
                exact = (self.x32[cand] * qt[:, None, :]).sum(dim=2)  # (B, c) float32
                top, pos = torch.topk(exact, kk, dim=1)
                idx = torch.gather(cand, 1, pos)
                eps = _low_precision_error(self.dtype, self.d) * self.max_norm * qt.norm(dim=1)
                bad = ~(top[:, kk - 1] > b + eps)
                nbad = int(bad.sum())
                if nbad:
                    ftop, fidx = torch.topk(self._exact_full(qt[bad]), kk, dim=1)
                    top[bad], idx[bad] = ftop, fidx
                self.stats["queries"] += len(qt)
                self.stats["exact_fallback"] += nbad
                sims[s:s + len(qt), :kk], rows[s:s + len(qt), :kk] = top.cpu().numpy(), idx.cpu().numpy()
        return sims, rows
