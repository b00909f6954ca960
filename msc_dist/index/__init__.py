"""A sharded FAISS index of normal-set embeddings, published as versions, and its search.

Layout (a folder or s3:// prefix, the embedding job's --out):

    current.json                               the pointer: which version is live (written last)
    versions/<id>/manifest.json                dimension, metric, counts, k, model id, threshold,
                                               sha256 of every file of the version
    versions/<id>/index/shard-0000.faiss       FAISS indexes over unit vectors, inner-product metric
    versions/<id>/index/shard-0000.ids.parquet row i = the sample id of that shard's vector i
    versions/<id>/embeddings/part-*.parquet    the embedding rows (cal-*: the calibration hold-out)
    versions/<id>/bank/shard-0000.faiss        with a patch bank (``manifest.patch``): IndexFlatL2 of
                                               each normal image's kept patches, one per index shard
    versions/<id>/bank/shard-0000.ids.parquet  row i = the sample id of that bank patch

One module a concern, each importing only those above it in this list:

    versions  the manifest, version names, the pointer, publishing and cleanup, resolving a version
    build     FAISS shards from vectors or Parquet parts, calibration distances and the threshold
    gpu       placing the shards on GPUs, and the exact two-stage search in torch
    load      the verified load of a version, whole or one group of its shards

This package hands on their public names, so ``from msc_dist.index import load_index`` works."""

from msc_dist.index.build import (MAX_TRAIN_ROWS, assign_parts, build_shard_from_parts, calibration_distances,
                                  iter_parts, merged_scores, needs_training, read_vectors, seeded_sample,
                                  threshold_at_fpr, threshold_from_shards, train_empty, train_from_parts,
                                  write_index)
from msc_dist.index.gpu import ExactTwoStage, clone_subs, place_subs
from msc_dist.index.load import ShardedIndex, load_index, load_shards, shard_group
from msc_dist.index.versions import (FORMAT, MANIFEST, POINTER, IndexManifest, IndexMismatch, ShardEntry,
                                     new_version, publish, read_manifest, read_pointer, resolve_version,
                                     version_root)
from msc_dist.storage import sha256

__all__ = [
    "FORMAT", "MANIFEST", "MAX_TRAIN_ROWS", "POINTER", "ExactTwoStage", "IndexManifest", "IndexMismatch",
    "ShardEntry", "ShardedIndex", "assign_parts", "build_shard_from_parts", "calibration_distances",
    "clone_subs", "iter_parts", "load_index", "load_shards", "merged_scores", "needs_training", "new_version",
    "place_subs", "publish", "read_manifest", "read_pointer", "read_vectors", "resolve_version", "seeded_sample",
    "shard_group", "sha256", "threshold_at_fpr", "threshold_from_shards", "train_empty", "train_from_parts",
    "version_root", "write_index",
]
