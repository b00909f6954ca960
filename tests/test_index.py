"""The sharded FAISS index against brute force, and its manifest checks (no Ray needed)."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from msc_dist.index import IndexMismatch, load_index, threshold_at_fpr, write_index


def _unit(n, d, seed):
    z = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.fixture()
def built(tmp_path):
    z = _unit(1000, 64, 0)
    ids = [f"id{i:04d}" for i in range(1000)]
    write_index(str(tmp_path), z, ids, "model-a", num_shards=4, calibration=_unit(50, 64, 2), target_fpr=0.1)
    return tmp_path, z, ids


def test_sharded_search_equals_brute_force(built):
    path, z, ids = built
    idx = load_index(str(path), expected_model_id="model-a")
    assert [s.count for s in idx.manifest.shards] == [250, 250, 250, 250]
    q = _unit(200, 64, 1)
    d, rows = idx.search(q, 2)
    bf = ((q[:, None, :].astype(np.float64) - z[None].astype(np.float64)) ** 2).sum(-1)  # (Q, N)
    order = np.argsort(bf, axis=1)[:, :2]
    assert np.array_equal(rows, order)
    assert np.allclose(d, np.take_along_axis(bf, order, 1), atol=1e-5)
    assert [idx.ids[r] for r in rows[0]] == [ids[i] for i in order[0]]
    score, _, _ = idx.score(q)
    assert np.allclose(score, np.take_along_axis(bf, order, 1).sum(1), atol=1e-5)
    assert np.array_equal(idx.vectors(), z)  # every vector back, in row order (what a re-shard copies)


def test_threshold_is_the_calibration_quantile(built):
    path, z, _ = built
    idx = load_index(str(path))
    cal_scores, _, _ = idx.score(_unit(50, 64, 2))
    assert idx.manifest.threshold == pytest.approx(threshold_at_fpr(cal_scores, 0.1), abs=1e-6)
    assert (cal_scores > idx.manifest.threshold).mean() <= 0.1


def test_ivf_pq_factory_builds_and_searches(tmp_path):
    z = _unit(2000, 32, 3)
    write_index(str(tmp_path), z, [str(i) for i in range(2000)], "m", num_shards=2, factory="IVF16,PQ8")
    d, rows = load_index(str(tmp_path)).search(z[:10], 2)
    assert (rows[:, 0] == np.arange(10)).mean() >= 0.8  # approximate, but finds itself


@pytest.mark.parametrize("damage,message", [
    ("missing_shard", "missing"),
    ("wrong_count", "count"),
    ("other_model", "does not match the checkpoint"),
    ("changed_bytes", "checksum"),
    ("no_manifest", "no current.json"),
])
def test_manifest_mismatch_is_a_clear_error(built, tmp_path_factory, damage, message):
    src, _, _ = built
    path = tmp_path_factory.mktemp("damaged")
    root = load_index(str(src)).root
    shutil.copytree(root, path / "v")
    path = path / "v"  # a pinned version folder
    man_path = path / "manifest.json"
    man = json.loads(man_path.read_text())
    expected = "model-a"
    shard = lambda i: path / man["shards"][i]["file"]  # noqa: E731
    if damage == "missing_shard":
        shard(2).unlink()
    elif damage == "wrong_count":
        man["count"] = 999
        man["shards"][0]["count"] = 249
        man_path.write_text(json.dumps(man))
    elif damage == "other_model":
        expected = "model-b"
    elif damage == "changed_bytes":
        with open(shard(1), "r+b") as f:
            f.seek(200)
            f.write(b"\x00\x01\x02")
    elif damage == "no_manifest":
        man_path.unlink()
    with pytest.raises(IndexMismatch, match=message):
        load_index(str(path), expected_model_id=expected)


def _write_parts(folder, z, ids, rows_per_part):
    """Parquet parts as the embedding job's writers leave them (id, embedding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for n, lo in enumerate(range(0, len(z), rows_per_part)):
        hi = min(len(z), lo + rows_per_part)
        t = pa.table({"id": pa.array(ids[lo:hi], pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(z[lo:hi].reshape(-1)), z.shape[1])})
        url = str(folder / f"part-{n:03d}.parquet")
        pq.write_table(t, url)
        urls.append((url, hi - lo))
    return urls


def _publish_parts(out, parts, cal_urls, factory, num_shards, trained=None, k=2, target_fpr=0.1):
    from msc_dist.index import (IndexManifest, ShardEntry, assign_parts, build_shard_from_parts, new_version, publish,
                                threshold_from_shards, version_root)

    version = new_version()
    built = [build_shard_from_parts(version_root(str(out), version), i, g, cal_urls, factory, trained, k)
             for i, g in enumerate(assign_parts(parts, num_shards))]
    entries = [ShardEntry(**b["entry"]) for b in built]
    thr = threshold_from_shards([b["cal"] for b in built], k, target_fpr)
    man = IndexManifest(64, sum(e.count for e in entries), entries, "m", version=version, k=k,
                        factory=factory, threshold=thr)
    publish(str(out), man)
    return man


def test_parallel_build_from_parts_equals_one_exact_search(tmp_path):
    """Shards built separately from Parquet parts (as the job's tasks do) answer exactly as one
    exact search over all vectors: same neighbours, same scores, same calibrated threshold."""
    z, cal = _unit(1100, 64, 5), _unit(60, 64, 6)
    ids = [f"s{i}" for i in range(len(z))]
    parts = _write_parts(tmp_path / "parts", z, ids, rows_per_part=97)
    cal_urls = [u for u, _ in _write_parts(tmp_path / "cal", cal, [f"c{i}" for i in range(60)], rows_per_part=25)]
    man = _publish_parts(tmp_path / "out", parts, cal_urls, "Flat", num_shards=4)
    assert len(man.shards) == 4 and man.count == 1100
    idx = load_index(str(tmp_path / "out"))
    q = _unit(150, 64, 7)
    d, rows = idx.search(q, 2)
    bf = ((q[:, None, :].astype(np.float64) - z[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(bf, axis=1)[:, :2]
    assert [[idx.ids[r] for r in rr] for rr in rows] == [[ids[i] for i in oo] for oo in order]
    assert np.allclose(d, np.take_along_axis(bf, order, 1), atol=1e-5)
    cal_bf = ((cal[:, None, :].astype(np.float64) - z[None].astype(np.float64)) ** 2).sum(-1)
    exact = np.sort(cal_bf, axis=1)[:, :2].sum(1)
    assert man.threshold == pytest.approx(threshold_at_fpr(exact, 0.1), abs=1e-5)


@pytest.mark.slow
def test_ivf_pq_from_parts_builds_publishes_and_loads(tmp_path):
    from msc_dist.index import train_from_parts

    z = _unit(3000, 64, 8)
    ids = [str(i) for i in range(3000)]
    parts = _write_parts(tmp_path / "parts", z, ids, rows_per_part=500)
    trained = train_from_parts([u for u, _ in parts[:4]], "IVF16,PQ8", seed=0)
    assert trained is not None
    _publish_parts(tmp_path / "out", parts, [], "IVF16,PQ8", num_shards=3, trained=trained)
    idx = load_index(str(tmp_path / "out"))
    assert idx.manifest.factory == "IVF16,PQ8" and idx.count == 3000 and len(idx.manifest.shards) == 3
    _, rows = idx.search(z[:50], 2)
    assert (rows[:, 0] == np.arange(50)).mean() >= 0.8  # approximate, but finds itself


def test_versions_publish_atomically_and_old_ones_go(tmp_path):
    z = _unit(200, 16, 9)
    ids = [str(i) for i in range(200)]
    v1 = write_index(str(tmp_path), z, ids, "m").version
    v2 = write_index(str(tmp_path), z[::-1].copy(), ids[::-1], "m").version
    assert load_index(str(tmp_path)).manifest.version == v2
    assert (tmp_path / "versions" / v1).exists()  # the replaced version stays for replicas still loading it
    v3 = write_index(str(tmp_path), z, ids, "m").version
    assert not (tmp_path / "versions" / v1).exists() and (tmp_path / "versions" / v2).exists()
    assert load_index(str(tmp_path)).manifest.version == v3
    pinned = load_index(str(tmp_path / "versions" / v2))  # pinning: load a version folder
    assert pinned.manifest.version == v2 and pinned.ids[0] == ids[-1]


def test_manifest_file_names_cannot_escape_the_index(built):
    path, _, _ = built
    man_path = pathlib.Path(load_index(str(path)).root) / "manifest.json"
    man = json.loads(man_path.read_text())
    man["shards"][0]["file"] = "../../etc/passwd"
    man_path.write_text(json.dumps(man))
    (path / "current.json").write_text(json.dumps({**json.loads((path / "current.json").read_text()),
                                                    "manifest_sha256": None}))
    with pytest.raises(IndexMismatch, match="refusing file name"):
        load_index(str(path))


def test_version_names_cannot_escape_the_index(tmp_path):
    """A version name from a pointer, a caller or a manifest is a file name too: one that leaves
    the index folder is refused as an IndexMismatch (the index's own error), naming where it came from."""
    from msc_dist.index import load_shards, publish, read_manifest

    man = write_index(str(tmp_path), _unit(20, 8, 0), [str(i) for i in range(20)], "m")
    pointer = json.loads((tmp_path / "current.json").read_text())
    (tmp_path / "current.json").write_text(json.dumps({**pointer, "version": "../../etc"}))
    with pytest.raises(IndexMismatch, match=r"current.json: refusing file name '../../etc'"):
        read_manifest(str(tmp_path))
    with pytest.raises(IndexMismatch, match="index version: refusing file name '/abs'"):
        load_shards(str(tmp_path), version="/abs")
    man.version = "../escaped"
    with pytest.raises(IndexMismatch, match="index version: refusing file name '../escaped'"):
        publish(str(tmp_path), man)
    assert not (tmp_path.parent / "escaped").exists()
