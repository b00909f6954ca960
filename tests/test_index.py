"""The sharded FAISS index against brute force, and its manifest checks (no Ray needed)."""

import json
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
    ("no_manifest", "no manifest.json"),
])
def test_manifest_mismatch_is_a_clear_error(built, tmp_path_factory, damage, message):
    src, _, _ = built
    path = tmp_path_factory.mktemp("damaged")
    shutil.copytree(src / "index", path / "index")
    man_path = path / "index" / "manifest.json"
    man = json.loads(man_path.read_text())
    expected = "model-a"
    if damage == "missing_shard":
        (path / "index" / "shard-0002.faiss").unlink()
    elif damage == "wrong_count":
        man["count"] = 999
        man["shards"][0]["count"] = 249
        man_path.write_text(json.dumps(man))
    elif damage == "other_model":
        expected = "model-b"
    elif damage == "changed_bytes":
        with open(path / "index" / "shard-0001.faiss", "r+b") as f:
            f.seek(200)
            f.write(b"\x00\x01\x02")
    elif damage == "no_manifest":
        man_path.unlink()
    with pytest.raises(IndexMismatch, match=message):
        load_index(str(path), expected_model_id=expected)
