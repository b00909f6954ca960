"""Loading an index version, every file verified against its manifest (count, dimension,
checksum, model id): all its shards (``load_index``) or one group of them (``load_shards``,
for serving an index spread over replicas)."""

from __future__ import annotations

import io

import numpy as np

from msc_dist import storage
from msc_dist.index.gpu import place_subs
from msc_dist.index.versions import MANIFEST, IndexManifest, IndexMismatch, read_manifest, version_root
from msc_dist.scoring import knn_from_similarities, squared_distances


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

    bank: list = []  # the patch bank's FAISS shards (IndexFlatL2), paired with the index shards loaded

    def search_patches(self, p: np.ndarray) -> np.ndarray:
        """(B, n, C) patch features -> (B, n) squared L2 distances to the nearest bank patch: the
        minimum over the bank shards, exactly one search of the whole bank."""
        from msc_dist.patches import nearest

        if not self.bank:
            raise IndexMismatch(f"index version {self.manifest.version or '?'} has no patch bank: rebuild it with "
                                "msc embed --score-mode patch (or --patch-bank)")
        return np.minimum.reduce([nearest(b, p) for b in self.bank])

    def vectors(self) -> np.ndarray:
        """(count, dimension) float32: every stored vector in row order, read back from the CPU
        sub-indexes (exact for Flat; the codes' reconstruction for IVF/PQ)."""
        return np.concatenate([s.reconstruct_n(0, s.ntotal) for s in self._subs])


def load_index(path: str, expected_model_id: str | None = None, use_gpu: bool = False) -> ShardedIndex:
    """The live (or pinned) version with every shard, verified (checksums, counts, dimension,
    model id): ``load_shards`` of all its shards."""
    man, _ = read_manifest(path)
    if sum(e.count for e in man.shards) != man.count:
        raise IndexMismatch(f"manifest count {man.count} does not match its shards ({sum(e.count for e in man.shards)})")
    return load_shards(path, None, expected_model_id, use_gpu)


def _load_subs(man: IndexManifest, folder: str, numbers: list[int]) -> tuple[list, list]:
    """(FAISS sub-indexes, their id arrays) of shards ``numbers``, each checked against the manifest."""
    import faiss
    import pyarrow.parquet as pq

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


def _load_bank(man: IndexManifest, folder: str, numbers: list[int]) -> list:
    """The patch-bank shards paired with index shards ``numbers``, each checked against the manifest."""
    import faiss

    if not man.patch:
        return []
    entries = man.bank_shards()
    if len(entries) != len(man.shards):
        raise IndexMismatch(f"the manifest lists {len(entries)} patch-bank shards for {len(man.shards)} index shards")
    dim, out = int(man.patch["dimension"]), []
    for i in numbers:
        e = entries[i]
        sub = faiss.deserialize_index(np.frombuffer(_read_checked(folder, e.file, e.sha256), dtype=np.uint8))
        if sub.d != dim or sub.ntotal != e.count:
            raise IndexMismatch(f"{e.file}: count/dimension mismatch: the file holds {sub.ntotal} patches of dimension "
                                f"{sub.d}, the manifest says {e.count} x {dim}")
        out.append(sub)
    return out


def _read_checked(folder: str, name: str, digest: str) -> bytes:
    """A file of a version folder, checked against its manifest digest (names stay inside it)."""
    url = storage.join(folder, storage.safe_name(name, storage.join(folder, MANIFEST), IndexMismatch))
    if not storage.exists(url):
        raise IndexMismatch(f"{url} is listed in the manifest but missing")
    data = storage.read_bytes(url)
    if storage.sha256(data) != digest:
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
        path = version_root(path, storage.safe_name(version, "index version", IndexMismatch))
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
    out.bank = _load_bank(man, folder, numbers)
    out.shard_numbers = numbers
    return out

