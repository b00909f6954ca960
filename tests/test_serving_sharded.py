"""An index spread over IndexShard deployments (serving/sharded.py), over HTTP on loopback: exact
answers, no partial answers when a shard replica dies, no answer that mixes index versions; and
the search paths under it: the exact two-stage search (CPU execution of the GPU path), FAISS
Flat and IVF on the CPU, shard groups and their merge."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serving/ folder at the repo root

from msc_dist.index import (  # noqa: E402
    ExactTwoStage, clone_subs, load_index, load_shards, shard_group, version_root, write_index,
)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q, x, k):
    sims = q.astype(np.float64) @ x.astype(np.float64).T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, 1), rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_two_stage_search_equals_brute_force(dtype):
    rng = np.random.default_rng(0)
    x = _unit(rng, 6000, 96)
    # Near-duplicates: the low-precision pass cannot order them, so those queries must be certified
    # as unsure and searched again in float32.
    x[3000:3200] = x[:200] + 2e-3 * rng.standard_normal((200, 96)).astype(np.float32)
    x[4000:4300] = np.repeat(x[:10], 30, axis=0) + 2e-3 * rng.standard_normal((300, 96)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = np.concatenate([_unit(rng, 150, 96), x[:150] + 1e-3 * _unit(rng, 150, 96)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    true = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-true, axis=1, kind="stable")[:, :5]
    fallback = 0
    for k in (1, 2, 5):
        idx = ExactTwoStage(x, device="cpu", dtype=dtype, candidates=8, max_scores_bytes=1 << 20)  # several chunks
        sims, rows = idx.search(q, k)
        ref_r = order[:, :k]
        ref_s = np.take_along_axis(true, ref_r, 1)
        # The same neighbours as float64 brute force, except where two scores tie in float32.
        differ = rows != ref_r
        assert differ.sum() <= 3, differ.sum()
        assert (np.abs(np.take_along_axis(true, rows, 1) - ref_s)[differ] < 1e-6).all()
        np.testing.assert_allclose(sims, ref_s, atol=1e-5)
        assert idx.stats["queries"] == len(q) and idx.stats["exact_fallback"] < len(q), idx.stats
        fallback += idx.stats["exact_fallback"]
    assert fallback > 0  # both paths taken: certified candidates, and float32 over everything
    small = ExactTwoStage(x[:3], device="cpu", dtype=dtype)  # fewer vectors than candidates, and than k
    sims, rows = small.search(q[:4], 5)
    assert (rows[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    np.testing.assert_array_equal(rows[:, :3], _brute(q[:4], x[:3], 3)[1])


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_faiss_on_cpu_shard_groups_and_sub_index_clones_equal_brute_force(tmp_path, factory):
    from serving.sharded import ShardUnavailable, merge_answers

    rng = np.random.default_rng(1)
    x, q = _unit(rng, 3000, 32), _unit(rng, 60, 32)
    ids = [f"s{i}" for i in range(len(x))]
    man = write_index(str(tmp_path), x, ids, "m", num_shards=5, factory=factory, k=3)

    def exact(index):  # IVF: probe every list, so the search is exhaustive
        import faiss

        for s in index._subs:
            if factory != "Flat":
                faiss.extract_index_ivf(s).nprobe = 8
        return index

    whole = exact(load_index(str(tmp_path), "m"))
    ref_s, ref_r = _brute(q, x, 3)
    d, rows = whole.search(q, 3)
    np.testing.assert_array_equal(whole.ids[rows], np.array(ids)[ref_r])
    np.testing.assert_allclose(d, np.maximum(2 - 2 * ref_s, 0), atol=1e-5)
    # Shard groups (3 deployments over 5 shards) merged = the whole index.
    answers = []
    for g in range(3):
        part = exact(load_shards(str(tmp_path), shard_group(5, g, 3), "m"))
        assert part.shard_numbers == shard_group(5, g, 3) == [i for i in range(5) if i % 3 == g]
        pd, pr = part.search(q, 3)
        answers.append({"version": man.version, "shards": part.shard_numbers, "d": pd, "ids": part.ids[pr].astype(object)})
    scores, md, mids = merge_answers(answers[::-1], 3, man.version, 5)
    np.testing.assert_array_equal(mids, whole.ids[rows])
    np.testing.assert_allclose(scores, d.sum(1), atol=1e-5)
    with pytest.raises(ShardUnavailable, match="versions"):
        merge_answers([answers[0], {**answers[1], "version": "v-other"}, answers[2]], 3, man.version, 5)
    with pytest.raises(ShardUnavailable, match="not all"):
        merge_answers(answers[:2], 3, man.version, 5)
    # The GPU placement clones every sub-index (never the IndexShards wrapper); one it cannot
    # place stays on the CPU. Here with CPU copies: same answers.
    import faiss

    def clone(i, s):
        if i == 1:
            raise RuntimeError("no GPU version of this index type")
        return faiss.clone_index(s)

    placed, subs = clone_subs(32, whole._subs, clone)
    assert subs[1] is whole._subs[1] and subs[0] is not whole._subs[0] and placed.count() == 5
    np.testing.assert_array_equal(placed.search(q, 3)[1], rows)
    if not torch.cuda.is_available():  # use_gpu on a machine without one: the CPU search, same answers
        cpu_too = exact(load_index(str(tmp_path), "m", use_gpu=True))
        np.testing.assert_array_equal(cpu_too.search(q, 3)[1], rows)
    with pytest.raises(Exception, match="checksum"):
        v = version_root(str(tmp_path), man.version)
        Path(v, man.shards[2].file).write_bytes(b"x")
        load_shards(str(tmp_path), [2], "m")
    with pytest.raises(Exception, match="model_id"):
        load_shards(str(tmp_path), [0], "another-model")


# --- Over HTTP ----------------------------------------------------------------------------------

from conftest import free_port as _free_port  # noqa: E402


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from msc_dist.data.demo import make_demo
    from msc_dist.data.shards import iter_samples

    root = tmp_path_factory.mktemp("shardimgs")
    make_demo(str(root), n_train=0, n_test_normal=100, n_test_defect=100, size=64, per_shard=500, seed=12)
    out = [s.data for s in iter_samples(str(root / "test" / "shard-000000.tar"))]
    assert len(out) == 200
    return out


@pytest.fixture(scope="module")
def sharded(embedded, tmp_path_factory):
    """One sharded app for the module: 2 IndexShard deployments over the 3 shards of a copy of
    the embedded index (the roll test publishes a new version there)."""
    from ray import serve

    from msc_dist.scorer import open_scorer
    from serving.app import build_app

    root = str(tmp_path_factory.mktemp("shardidx") / "index")
    shutil.copytree(embedded["out"], root)
    port = _free_port()
    serve.shutdown()  # a Serve left by an earlier test file keeps its own port and ignores ours
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": embedded["run_dir"], "index": root, "index_shards": 2, "max_files": 64,
                         "index_poll_s": 1, "shard_timeout_s": 3, "api_key_env": "MSC_TEST_NO_SUCH_VAR", "allow_anonymous": True,
                         "model_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                         "shard_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                         "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}), name="sharded", route_prefix="/")
    ref = open_scorer(root, embedded["checkpoint"])
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "scorer": ref, "checkpoint": embedded["checkpoint"]}
    serve.shutdown()


def _same(got: dict, exp) -> bool:
    return (abs(got["score"] - exp.score) <= 1e-5 and [n["id"] for n in got["neighbors"]] == [n["id"] for n in exp.neighbors]
            and got["is_anomaly"] == exp.is_anomaly)


def test_sharded_answers_equal_one_unsharded_index(sharded, images):
    url, ref = sharded["url"], sharded["scorer"]
    expected = ref.score_bytes(images)
    got = []
    with httpx.Client(timeout=60) as c:
        info = c.get(f"{url}/v1/model").json()
        assert info["index_shards"] == 3 and info["index_shard_groups"] == 2, info
        assert info["model_id"] == ref.model_id and info["index_size"] == ref.index.count
        assert info["index_version"] == ref.index.manifest.version
        for s in range(0, len(images), 50):
            r = c.post(f"{url}/v1/score", files=[("f", (f"{i}.jpg", images[i], "image/jpeg")) for i in range(s, s + 50)])
            assert r.status_code == 200, r.text
            got += r.json()
    assert len(got) == 200
    diff = max(abs(g["score"] - e.score) for g, e in zip(got, expected))
    assert diff <= 1e-5, diff
    for g, e in zip(got, expected):
        assert [n["id"] for n in g["neighbors"]] == [n["id"] for n in e.neighbors]
        assert [n["distance"] for n in g["neighbors"]] == pytest.approx([n["distance"] for n in e.neighbors], abs=1e-5)
        assert g["threshold"] == pytest.approx(ref.threshold) and g["is_anomaly"] == e.is_anomaly
        assert g["index_version"] == ref.index.manifest.version


def _load(url: str, images: list[bytes], stop: threading.Event, log: list) -> list[threading.Thread]:
    def client(i):
        with httpx.Client(timeout=60) as c:
            j = i
            while not stop.is_set():
                j = (j + 1) % len(images)
                r = c.post(f"{url}/v1/score", content=images[j], headers={"content-type": "image/jpeg"})
                log.append((time.time(), j, r.status_code, r.json() if r.status_code == 200 else r.headers.get("retry-after")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    return threads


def test_killed_shard_replica_gives_only_exact_200s_and_503s(sharded, images):
    from test_serving import _replica_pids

    url, imgs = sharded["url"], images[:12]
    expected = sharded["scorer"].score_bytes(imgs)
    pids = _replica_pids("ray::ServeReplica:sharded:IndexShard-1")
    assert pids, "no IndexShard-1 replica process found"
    stop, log = threading.Event(), []
    threads = _load(url, imgs, stop, log)
    time.sleep(2)
    t_kill = time.time()
    for p in pids:
        os.kill(p, signal.SIGKILL)
    deadline = time.time() + 90
    while time.time() < deadline:  # until answers come back from the replaced replica
        after = [e for e in log if e[0] > t_kill + 1]
        if sum(e[2] == 200 for e in after[-10:]) == 10 and len(after) >= 10:
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    codes = {e[2] for e in log}
    assert codes <= {200, 503}, {c: sum(e[2] == c for e in log) for c in codes}
    assert all(e[3] for e in log if e[2] == 503)  # Retry-After
    wrong = [e for e in log if e[2] == 200 and not _same(e[3][0], expected[e[1]])]
    assert not wrong, wrong[:3]
    assert sum(e[2] == 200 for e in log if e[0] > t_kill + 1) >= 10, "no answers after the shard replica was replaced"
    assert set(_replica_pids("ray::ServeReplica:sharded:IndexShard-1")).isdisjoint(pids)
    print(f"kill: {sum(e[2] == 200 for e in log)} x 200, {sum(e[2] == 503 for e in log)} x 503")


def test_version_roll_never_mixes_versions(sharded, images):
    from msc_dist.scorer import open_scorer

    url, root, imgs = sharded["url"], sharded["root"], images[:12]
    old = load_index(root)
    va = old.manifest.version
    z = np.concatenate([s.reconstruct_n(0, s.ntotal) for s in old._subs])
    keep = np.arange(len(z)) % 3 != 0  # version B: two thirds of the vectors, split differently
    stop, log = threading.Event(), []
    threads = _load(url, imgs, stop, log)
    time.sleep(2)
    new = write_index(root, z[keep], list(old.ids[keep]), old.manifest.model_id, num_shards=3, k=old.manifest.k)
    vb = new.version
    deadline = time.time() + 60
    while time.time() < deadline and not any(e[2] == 200 and e[3][0]["index_version"] == vb for e in log[-8:]):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    refs = {va: sharded["scorer"].score_bytes(imgs), vb: open_scorer(version_root(root, vb), sharded["checkpoint"]).score_bytes(imgs)}
    assert sum(not _same({**a.to_dict()}, b) for a, b in zip(refs[va], refs[vb])) >= 6  # the versions answer differently
    codes = {e[2] for e in log}
    assert codes <= {200, 503}, {c: sum(e[2] == c for e in log) for c in codes}
    seen = {}
    for _, j, code, body in log:
        if code == 200:
            v = body[0]["index_version"]
            seen[v] = seen.get(v, 0) + 1
            assert _same(body[0], refs[v][j]), (v, j, body[0])
    assert set(seen) == {va, vb}, seen
    last = [e for e in log if e[2] == 200][-4:]
    assert all(e[3][0]["index_version"] == vb for e in last)
    print(f"roll: {seen}, {sum(e[2] == 503 for e in log)} x 503")
