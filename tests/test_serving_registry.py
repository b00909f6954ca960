"""Multiplexed serving on the local Ray: one app serves every detector of a registry, each
replica holding at most max_detectors_per_replica of them (Serve's model multiplexing, LRU)."""

from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serving/ folder at the repo root

from conftest import free_port, noise_images, tiny_checkpoint, tiny_index  # noqa: E402

N_DETECTORS = 20
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def fleet(local_ray, tmp_path_factory):
    """20 tiny detectors (each its own checkpoint and index, built in-process) in one registry,
    and the app serving them: 2 Model replicas of at most 4 detectors each."""
    from ray import serve

    from msc_dist import registry
    from msc_dist.index import version_root
    from msc_dist.scorer import open_scorer
    from serving.app import build_app

    tmp = tmp_path_factory.mktemp("fleet")
    reg = tmp / "registry"
    normals = {f"n{i}": b for i, b in enumerate(noise_images(8, seed=3))}
    queries = noise_images(3, w=40, h=56, seed=4, fmt="JPEG")
    names = [f"line-{i}" if i % 2 else f"plant-{i % 3}/cam-{i}" for i in range(N_DETECTORS)]
    expected = {}
    for i, name in enumerate(names):
        ck = tiny_checkpoint(tmp / f"ck{i}", image_size=32, resize_mode="squash", seed=100 + i)
        man = tiny_index(registry.root(str(reg), name), ck, normals)
        scorer = open_scorer(version_root(registry.root(str(reg), name), man.version))
        expected[name] = (man.version, [r.score for r in scorer.score_bytes(queries)])
    port = free_port()
    serve.shutdown()  # a Serve left by an earlier test file keeps its own port and ignores ours
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"registry": str(reg), "max_detectors_per_replica": 4, "index_poll_s": 1,
                         "allow_anonymous": True, "api_key_env": "MSC_TEST_NO_SUCH_VAR",
                         "model_options": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
                         "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}),
              name="fleet", route_prefix="/fleet")
    yield {"url": f"http://127.0.0.1:{port}/fleet", "reg": str(reg), "names": names, "queries": queries,
           "expected": expected, "tmp": tmp, "normals": normals}
    serve.delete("fleet")


def _score(c: httpx.Client, url: str, name: str, body: bytes) -> httpx.Response:
    return c.post(f"{url}/v1/detectors/{name}/score", content=body, headers=JPEG)


def _replica_stats(min_replicas: int = 2, tries: int = 200) -> dict:
    """Model.stats() of every replica (the handle spreads calls over them), by replica id."""
    from ray import serve

    h = serve.get_deployment_handle("Model", app_name="fleet")
    seen = {}
    for _ in range(tries):
        s = h.stats.remote().result(timeout_s=30)
        seen[s["replica"]] = s
        if len(seen) >= min_replicas:
            break
    return seen


def test_every_answer_is_its_own_detectors_score_and_replicas_evict(fleet):
    url, names, queries, expected = fleet["url"], fleet["names"], fleet["queries"], fleet["expected"]
    rng = random.Random(0)
    jobs = [(rng.choice(names), rng.randrange(len(queries))) for _ in range(240)]

    def one(job):
        name, q = job
        with httpx.Client(timeout=60) as c:
            r = _score(c, url, name, queries[q])
        return name, q, r.status_code, r.json()

    with ThreadPoolExecutor(6) as ex:
        answers = list(ex.map(one, jobs))
    bad = [a for a in answers if a[2] != 200]
    assert not bad, bad[:3]
    wrong = [(n, q, a[0]["index_version"], a[0]["score"]) for n, q, _, a in answers
             if a[0]["index_version"] != expected[n][0] or abs(a[0]["score"] - expected[n][1][q]) > 1e-5]
    assert not wrong, wrong[:5]  # no request was answered by another detector
    assert {n for n, *_ in answers} == set(names)
    stats = _replica_stats()
    assert len(stats) == 2, stats
    assert all(len(s["held"]) <= 4 for s in stats.values()), stats
    assert sum(s["evictions"] for s in stats.values()) > 0 and sum(s["loads"] for s in stats.values()) >= N_DETECTORS, stats


def test_unknown_names_get_404_and_the_registry_is_listed(fleet):
    url, names = fleet["url"], fleet["names"]
    body = fleet["queries"][0]
    with httpx.Client(timeout=60) as c:
        for name in ("no-such", "plant-0/none", "Bad", "a/b/c", "..%2Fetc", "a.b"):
            r = _score(c, url, name, body)
            assert r.status_code == 404 and "/v1/detectors" in r.json()["error"]["message"], (name, r.status_code, r.text)
            assert c.get(f"{url}/v1/detectors/{name}").status_code == 404
        listed = c.get(f"{url}/v1/detectors").json()
        assert [d["name"] for d in listed["detectors"]] == sorted(names) and listed["default"] is None
        one = c.get(f"{url}/v1/detectors/{names[2]}").json()
        assert one["version"] == fleet["expected"][names[2]][0] and one["score"] == f"/v1/detectors/{names[2]}/score"
        assert "checkpoint" not in one
        r = c.post(f"{url}/v1/score", content=body, headers=JPEG)  # no default yet: 404 that points to the list
        assert r.status_code == 404 and "/v1/detectors" in r.json()["error"]["message"], r.text


def test_default_detector_serves_v1_score(fleet):
    from msc_dist import registry

    url, name = fleet["url"], fleet["names"][3]
    registry.set_default(fleet["reg"], name)
    deadline = time.time() + 20
    with httpx.Client(timeout=60) as c:
        while True:
            r = c.post(f"{url}/v1/score", content=fleet["queries"][1], headers=JPEG)
            if r.status_code == 200 or time.time() > deadline:
                break
            time.sleep(0.3)
    assert r.status_code == 200, r.text
    assert r.json()[0]["score"] == pytest.approx(fleet["expected"][name][1][1], abs=1e-5)


def test_a_new_version_of_one_detector_rolls_while_the_others_answer(fleet):
    """Detector 0 gets a new version (another checkpoint and image size) under load on it and on
    three others: only 200s, each answer the score of the version it names; the others keep
    their version."""
    from msc_dist import registry
    from msc_dist.index import version_root
    from msc_dist.scorer import open_scorer

    url, names, queries, expected = fleet["url"], fleet["names"], fleet["queries"], fleet["expected"]
    target, others = names[0], names[1:4]
    scores = {expected[target][0]: expected[target][1]}
    answers, stop = [], threading.Event()

    def client(name):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = _score(c, url, name, queries[0])
                answers.append((name, r.status_code, r.json()[0] if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=client, args=(n,)) for n in [target, target, *others]]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        ck = tiny_checkpoint(fleet["tmp"] / "ck-new", image_size=40, resize_mode="center_crop", seed=999)
        root = registry.root(fleet["reg"], target)
        man = tiny_index(root, ck, fleet["normals"])
        scores[man.version] = [r.score for r in open_scorer(version_root(root, man.version)).score_bytes(queries)]
        deadline = time.time() + 30
        while time.time() < deadline and sum(1 for n, _, a in answers if n == target and isinstance(a, dict)
                                              and a["index_version"] == man.version) < 5:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = [c for _, c, _ in answers]
    assert codes and set(codes) == {200}, [a for a in answers if a[1] != 200][:3]
    mine = [a for n, _, a in answers if n == target]
    assert {a["index_version"] for a in mine} == set(scores), {a["index_version"] for a in mine}
    assert all(abs(a["score"] - scores[a["index_version"]][0]) < 1e-5 for a in mine)
    for n, _, a in answers:
        if n != target:
            assert a["index_version"] == expected[n][0] and abs(a["score"] - expected[n][1][0]) < 1e-5
    expected[target] = (man.version, scores[man.version])


def test_a_removed_detector_gets_404_within_the_poll_interval(fleet):
    from msc_dist import registry

    url, name = fleet["url"], fleet["names"][5]
    with httpx.Client(timeout=60) as c:
        assert _score(c, url, name, fleet["queries"][0]).status_code == 200  # loaded on a replica
        registry.remove(fleet["reg"], name)
        t0 = time.time()
        while time.time() < t0 + 15:
            r = _score(c, url, name, fleet["queries"][0])
            if r.status_code != 200:
                break
            time.sleep(0.2)
        took = time.time() - t0
        assert r.status_code == 404 and f"no detector {name!r}" in r.json()["error"]["message"], r.text
        assert took < 5, f"404 only after {took:.1f}s (poll interval 1 s)"
        assert _score(c, url, fleet["names"][6], fleet["queries"][0]).status_code == 200


def test_requests_in_flight_across_a_remove_end_in_200_or_404_never_an_error(fleet):
    """Clients hammer a detector while it is removed: every answer is its score (200, until the
    replica's poll sees the removal) or a 404 naming it (after), never a 5xx or a cut connection;
    answers sent while the removal is being noticed still finish with the detector's score, and
    once a 404 came, no later request is answered 200."""
    from msc_dist import registry

    url, name, queries = fleet["url"], fleet["names"][7], fleet["queries"]
    version, scores = fleet["expected"][name]
    answers, stop, removed_at = [], threading.Event(), []

    def client():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                t0 = time.time()
                r = _score(c, url, name, queries[1])
                answers.append((t0, time.time(), r.status_code, r.json() if r.status_code in (200, 404) else r.text))

    with httpx.Client(timeout=60) as c:
        assert _score(c, url, name, queries[1]).status_code == 200  # loaded on a replica
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        removed_at.append(time.time())
        registry.remove(fleet["reg"], name)
        deadline = time.time() + 15
        while time.time() < deadline and sum(1 for a in answers if a[2] == 404) < 8:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = {a[2] for a in answers}
    assert codes == {200, 404}, [a for a in answers if a[2] not in (200, 404)][:3]
    for t0, t1, code, body in answers:
        if code == 200:
            assert body[0]["index_version"] == version and abs(body[0]["score"] - scores[1]) < 1e-5
        else:
            assert f"no detector {name!r}" in body["error"]["message"]
    assert any(code == 200 and t1 > removed_at[0] for _, t1, code, _ in answers)  # in flight at the removal: finished
    first_404 = min(t1 for _, t1, code, _ in answers if code == 404)
    assert not [a for a in answers if a[2] == 200 and a[0] > first_404 + 2.0]  # replicas poll every 1 s


def test_a_detector_slower_to_load_than_the_deadline_gets_503_and_its_load_goes_on(fleet, tmp_path):
    """A cold detector whose load outlasts request_timeout_s: a real slow load, not a hook (an
    onnxruntime replica with an empty graph cache exports and checks the checkpoint's graph on
    first use; the deadline is set well under the time that build took in this process). The
    first requests get 503 with Retry-After, never a 500; the load is not restarted by them (one
    load, one graph in the cache) and the first request after it ends gets 200 with the detector's
    own score."""
    from ray import serve

    from msc_dist import registry
    from msc_dist.card import load_card
    from msc_dist.index import version_root
    from msc_dist.scorer import open_scorer
    from serving.app import build_app

    t0 = time.perf_counter()  # what one cold build of this kind of graph costs here
    load_card(tiny_checkpoint(tmp_path / "probe", image_size=32, resize_mode="squash", seed=7), "cpu", "onnxruntime",
              cache=str(tmp_path / "probe-cache"))
    build_s = time.perf_counter() - t0
    deadline_s = round(max(0.3, build_s / 4), 2)
    reg, cache, name = tmp_path / "registry", tmp_path / "cache", "slow-line"
    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="squash", seed=8)
    man = tiny_index(registry.root(str(reg), name), ck, fleet["normals"])
    want = [r.score for r in open_scorer(version_root(registry.root(str(reg), name), man.version)).score_bytes(fleet["queries"])]
    url = fleet["url"].rsplit("/", 1)[0] + "/slow"
    env = {"env_vars": {"MSC_RUNTIME_CACHE": str(cache)}}
    serve.run(build_app({"registry": str(reg), "runtime": "onnxruntime", "request_timeout_s": deadline_s,
                         "retry_after_s": 2, "allow_anonymous": True, "api_key_env": "MSC_TEST_NO_SUCH_VAR",
                         "model_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25, "runtime_env": env}},
                         "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}),
              name="slow", route_prefix="/slow")
    try:
        answers, t_start = [], time.time()
        with httpx.Client(timeout=60) as c:
            while time.time() < t_start + 120:
                r = _score(c, url, name, fleet["queries"][2])
                answers.append((r.status_code, r.headers.get("retry-after"), r.json()))
                if r.status_code == 200:
                    break
                time.sleep(0.05)
        codes = [a[0] for a in answers]
        assert codes[0] == 503 and codes[-1] == 200 and set(codes) == {503, 200}, (build_s, deadline_s, answers[:3])
        assert all(a[1] == "2" and f"timed out after {deadline_s}s" in a[2]["error"]["message"]
                   for a in answers if a[0] == 503), answers[:3]
        assert abs(answers[-1][2][0]["score"] - want[2]) < 1e-4 and answers[-1][2][0]["index_version"] == man.version
        stats = serve.get_deployment_handle("Model", app_name="slow").stats.remote().result(timeout_s=30)
        assert stats["loads"] == 1 and stats["held"] == [name], (stats, len(answers))  # never restarted by a retry
        assert len([p for p in cache.iterdir() if p.is_dir()]) == 1, list(cache.iterdir())  # one graph, built once
    finally:
        serve.delete("slow")
