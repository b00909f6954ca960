"""The Ray Serve app over HTTP on loopback: scores, bad input, auth, load, autoscaling, a killed replica."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serving/ folder at the repo root

from msc_dist.data.demo import make_demo  # noqa: E402
from msc_dist.data.shards import iter_samples  # noqa: E402
from msc_dist.scorer import open_scorer  # noqa: E402


from conftest import free_port as _free_port  # noqa: E402


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("serveimgs")
    make_demo(str(root), n_train=0, n_test_normal=6, n_test_defect=6, size=64, per_shard=50, seed=11)
    return [s.data for s in iter_samples(str(root / "test" / "shard-000000.tar"))]


@pytest.fixture(scope="module")
def serving(embedded, tmp_path_factory):
    from ray import serve

    from serving.app import build_app

    port = _free_port()
    serve.shutdown()  # a Serve left by an earlier test file keeps its own port and ignores ours
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The index only: its manifest names the checkpoint. Auth is off only because it is said so.
    base = {"index": embedded["out"], "max_body_bytes": 2_000_000, "max_files": 4, "max_pixels": 10_000_000,
            "api_key_env": "MSC_TEST_NO_SUCH_VAR", "allow_anonymous": True}
    fast_scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                    "downscale_delay_s": 4, "look_back_period_s": 2}
    serve.run(build_app({**base, "model_options": {"autoscaling_config": fast_scaling, "ray_actor_options": {"num_cpus": 1}},
                         "gateway_options": {"ray_actor_options": {"num_cpus": 0.5}}}), name="msc", route_prefix="/")
    key_file = tmp_path_factory.mktemp("secret") / "key"
    key_file.write_text("s3cret-key\n")
    serve.run(build_app({**base, "api_key_file": str(key_file), "allow_anonymous": False,
                         "max_request_pixels": 15_000_000, "max_inflight_bytes": 3_000_000,
                         "model_options": {"ray_actor_options": {"num_cpus": 0.25}},
                         "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}), name="secure", route_prefix="/secure")
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "scorer": open_scorer(embedded["out"], embedded["checkpoint"])}
    serve.shutdown()


def test_scores_equal_the_offline_scorer(serving, images):
    url, scorer = serving["url"], serving["scorer"]
    expected = scorer.score_bytes(images[:5])
    with httpx.Client(timeout=30) as c:
        for data, exp in zip(images[:3], expected):
            r = c.post(f"{url}/v1/score", content=data, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            (got,) = r.json()
            assert got["score"] == pytest.approx(exp.score, abs=1e-5)
            assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in exp.neighbors]
            assert got["threshold"] == pytest.approx(scorer.threshold) and got["is_anomaly"] == exp.is_anomaly
        files = [("files", (f"im{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images[:4])]
        r = c.post(f"{url}/v1/score", files=files)
        assert r.status_code == 200, r.text
        assert [x["score"] for x in r.json()] == pytest.approx([e.score for e in scorer.score_bytes(images[:4])], abs=1e-5)
        info = c.get(f"{url}/v1/model").json()
        assert info["model_id"] == scorer.model_id and info["index_size"] == scorer.index.count
        assert info["image_size"] == 64 and info["backbone"] == "efficientnet_lite0"
        assert info["resize_mode"] == "squash" == scorer.resize_mode  # the checkpoint's, not the default
        assert c.get(f"{url}/healthz").json() == {"status": "ok"}
        assert "/v1/score" in c.get(f"{url}/openapi.json").json()["paths"]


def _png(w, h, mode="L") -> bytes:
    return _encoded("PNG", w, h, mode)


def _encoded(fmt: str, w: int = 48, h: int = 48, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format=fmt)
    return buf.getvalue()


def test_bad_input_gets_a_4xx_that_says_why_and_the_app_stays_healthy(serving, images):
    url = serving["url"]
    good = images[0]
    chunked = (os.urandom(250_000) for _ in range(10))  # no Content-Length: only the streaming check can stop it
    text_only = b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--xyz--\r\n'
    cases = [
        ("empty body", dict(content=b"", headers={"content-type": "image/jpeg"}), 400, "empty body"),
        ("not an image", dict(content=b"%PDF-1.4 hello", headers={"content-type": "image/png"}), 422, "not a decodable image"),
        ("truncated", dict(content=good[: len(good) // 2], headers={"content-type": "image/jpeg"}), 422, "not a decodable image"),
        # 16 MP: above the Gateway's max_pixels (10 MP), below Pillow's own bomb guard (89 MP warns).
        ("bomb", dict(content=_png(4000, 4000, "1"), headers={"content-type": "image/png"}), 413, "above the limit of 10000000"),
        ("too big", dict(content=chunked, headers={"content-type": "image/jpeg"}), 413, "above the limit of 2000000"),
        ("wrong type", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "not accepted"),
        ("bmp", dict(content=_encoded("BMP"), headers={"content-type": "image/png"}), 415, "BMP images are not accepted"),
        ("tiff part", dict(files=[("f", ("a.tif", _encoded("TIFF"), "image/tiff"))]), 415, "TIFF images are not accepted"),
        ("too many files", dict(files=[("f", (f"{i}.jpg", good, "image/jpeg")) for i in range(5)]), 413, "too many files"),
        ("no files", dict(content=text_only, headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "no files"),
    ]
    wrong = []  # every case is tried, so that one run names all that fail
    with httpx.Client(timeout=30) as c:
        for name, kw, status, text in cases:
            r = c.post(f"{url}/v1/score", **kw)
            msg = r.json()["error"]["message"] if r.status_code >= 400 else ""
            if r.status_code != status or text not in msg:
                wrong.append((name, r.status_code, r.text[:200]))
        assert not wrong, wrong
        r = c.post(f"{url}/v1/score", content=good, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()[0]["score"] is not None


def test_api_key(serving, images):
    url, good = serving["url"], images[0]
    h = {"content-type": "image/jpeg"}
    with httpx.Client(timeout=30) as c:
        assert c.post(f"{url}/secure/v1/score", content=good, headers=h).status_code == 401
        r = c.post(f"{url}/secure/v1/score", content=good, headers={**h, "authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = c.post(f"{url}/secure/v1/score", content=good, headers={**h, "authorization": "Bearer s3cret-key"})
        assert r.status_code == 200
        assert c.post(f"{url}/v1/score", content=good, headers=h).status_code == 200  # allow_anonymous: true


AUTH = {"authorization": "Bearer s3cret-key"}


def test_model_info_shows_no_storage_uri(serving):
    with httpx.Client(timeout=30) as c:
        r = c.get(f"{serving['url']}/secure/v1/model", headers=AUTH)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["model_id"] == serving["scorer"].model_id
    leaked = {k: v for k, v in info.items() if isinstance(v, str) and ("/" in v or "://" in v)}
    assert "checkpoint" not in info and "index" not in info and not leaked, info


def test_pixel_budget_per_request(serving):
    """Each image is under max_pixels (10 MP), together they exceed max_request_pixels (15 MP):
    refused from the headers alone, before any pixel is decoded."""
    nine_mp = _png(3000, 3000)
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{serving['url']}/secure/v1/score", headers=AUTH,
                   files=[("f", (f"{i}.png", nine_mp, "image/png")) for i in range(2)])
        assert r.status_code == 413 and "max_request_pixels" in r.json()["error"]["message"], r.text
        r = c.post(f"{serving['url']}/secure/v1/score", headers=AUTH, files=[("f", ("0.png", nine_mp, "image/png"))])
        assert r.status_code == 200, r.text


def test_bodies_in_flight_are_capped_per_replica(serving):
    """An upload that stalls holds its bytes; another body that would take the replica above
    max_inflight_bytes (3 MB) gets 503 + Retry-After; once the first ends, bodies are taken again."""
    url = f"{serving['url']}/secure/v1/score"
    h = {**AUTH, "content-type": "image/jpeg"}
    release, first = threading.Event(), {}

    def stalled_body():
        yield os.urandom(1_800_000)
        release.wait(30)
        yield b"x"

    def slow():
        first["r"] = httpx.post(url, content=stalled_body(), headers=h, timeout=60)

    t = threading.Thread(target=slow)
    t.start()
    try:
        time.sleep(2)  # the first 1.8 MB have reached the Gateway
        r = httpx.post(url, content=os.urandom(1_500_000), headers=h, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (r.status_code, r.text)
        assert "in flight" in r.json()["error"]["message"]
    finally:
        release.set()
        t.join()
    assert first["r"].status_code == 422, first["r"].text  # random bytes: decoded, not refused for load
    r = httpx.post(url, content=os.urandom(1_500_000), headers=h, timeout=60)
    assert r.status_code == 422, r.text


def _gradient_png(w: int, h: int) -> bytes:
    a = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_decoding_does_not_block_the_event_loop(serving):
    """Four requests of four 10 MP PNGs each (a few seconds of decoding) run while /healthz is
    polled on the same Gateway replica: it keeps answering. What is bounded is the loop's stall,
    the time the 15 probes took beyond their idle time: decoded on the event loop, every probe
    that arrives during a request's decode waits for it, so the probes together wait for most of
    the decoding (measured on 2 cores: 2.6 s, the slow probes 0.51 / 0.71 / 1.18 s); decoded off
    it, one scheduler spike of 0.38 s and 0.2 s of small delays (a worst probe of 0.50 s once in
    a CI run: the four decode threads compete for the 2 cores). Hence the 1.25 s bound, which a
    single slow probe cannot reach and a blocked loop cannot stay under."""
    url = serving["url"]
    heavy = _gradient_png(3160, 3160)  # ~40 KB, ~0.2 s to decode
    files = [("f", (f"{i}.png", heavy, "image/png")) for i in range(4)]
    with httpx.Client(timeout=30) as c:
        c.post(f"{url}/v1/score", files=files[:1])  # warm: the Gateway has fetched the image size

        def probe(n):
            took = []
            for _ in range(n):
                t = time.perf_counter()
                assert c.get(f"{url}/healthz").status_code == 200
                took.append(time.perf_counter() - t)
                time.sleep(0.05)
            return took

        idle = float(np.median(probe(10)))
        with ThreadPoolExecutor(4) as ex:
            t0 = time.perf_counter()
            futs = [ex.submit(lambda: httpx.post(f"{url}/v1/score", files=files, timeout=60)) for _ in range(4)]
            time.sleep(0.3)
            busy = probe(15)
            codes = [f.result().status_code for f in futs]
            took = time.perf_counter() - t0
    assert codes == [200] * 4, codes
    stall = sum(busy) - len(busy) * idle
    assert stall < 1.25, (f"/healthz stalled {stall:.2f}s while decoding ({took:.1f}s for the uploads; idle probe "
                          f"{idle:.3f}s; probes {[round(x, 2) for x in busy]})")


def test_images_are_scored_only_by_the_version_they_were_decoded_for(serving, images):
    """The Model scores pixels with the index version (and model card) named with them; pixels of
    another size are refused, never resized to fit; a version it does not hold gets the live card
    back, for the Gateway to decode the request again."""
    from ray import serve

    from msc_dist.data.decode import Preprocess

    model = serve.get_deployment_handle("Model", app_name="secure")
    card = model.card.remote().result(timeout_s=60)
    pre = Preprocess.from_dict(card["preprocess"])
    assert (pre.image_size, pre.resize_mode) == (64, "squash")  # the shared checkpoint's card
    a, b = model.score.remote([pre(images[0]), pre(images[1])], card["version"]).result(timeout_s=60)
    assert a["index_version"] == b["index_version"] == card["version"] and len(a["neighbors"]) == 2
    assert model.score.remote([pre(images[0])], "v-gone").result(timeout_s=60) == card
    small = Preprocess(48, "squash", pre.mean, pre.std)(images[0])
    with pytest.raises(Exception, match="decoded for another model"):
        model.score.remote([small], card["version"]).result(timeout_s=60)


def _follow_app(index: str, name: str):
    from ray import serve

    from serving.app import build_app

    serve.run(build_app({"index": index, "index_poll_s": 1, "allow_anonymous": True,
                         "model_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                         "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}),
              name=name, route_prefix=f"/{name}")


@pytest.mark.slow
def test_the_single_layout_follows_the_published_version_under_load(serving, tmp_path):
    """A new version published into the served index root (another checkpoint, another image size
    and resize mode) rolls in within the poll interval under load: only 200s, each answer the
    score of the version it names (so none mixed two versions, and none was resized to fit the
    new card); a pinned version folder does not move."""
    from ray import serve

    from conftest import noise_images, tiny_checkpoint, tiny_index
    from msc_dist.index import version_root
    from msc_dist.scorer import open_scorer

    root = tmp_path / "idx"
    normals = {f"n{i}": b for i, b in enumerate(noise_images(12, seed=3))}
    queries = noise_images(4, w=40, h=56, seed=4, fmt="JPEG")
    ck_a = tiny_checkpoint(tmp_path / "a", image_size=32, resize_mode="center_crop", seed=1)
    ck_b = tiny_checkpoint(tmp_path / "b", image_size=40, resize_mode="squash", seed=2)
    man_a = tiny_index(root, ck_a, normals)
    pinned = version_root(str(root), man_a.version)
    expected = {man_a.version: [r.score for r in open_scorer(pinned).score_bytes(queries)]}
    _follow_app(str(root), "follow")
    _follow_app(pinned, "pinned")
    url = serving["url"]
    assert httpx.get(f"{url}/follow/v1/model", timeout=30).json()["version"] == man_a.version
    answers, stop = [], threading.Event()

    def client(i):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{url}/follow/v1/score", content=queries[i], headers={"content-type": "image/jpeg"})
                answers.append((i, r.status_code, r.json()[0] if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        man_b = tiny_index(root, ck_b, normals)
        expected[man_b.version] = [r.score for r in open_scorer(version_root(str(root), man_b.version)).score_bytes(queries)]
        deadline = time.time() + 30
        while time.time() < deadline and httpx.get(f"{url}/follow/v1/model", timeout=30).json()["version"] != man_b.version:
            time.sleep(0.2)
        rolled = time.time()
        while time.time() < rolled + 2 or sum(1 for _, _, a in answers if isinstance(a, dict)
                                              and a["index_version"] == man_b.version) < 8:
            time.sleep(0.2)
            if time.time() > deadline + 30:
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = [c for _, c, _ in answers]
    assert codes and set(codes) == {200}, [a for a in answers if a[1] != 200][:3]
    seen = {a["index_version"] for _, _, a in answers}
    assert seen == {man_a.version, man_b.version}, seen
    wrong = [(i, a["index_version"], a["score"]) for i, _, a in answers
             if abs(a["score"] - expected[a["index_version"]][i]) > 1e-5]
    assert not wrong, wrong[:5]
    info = httpx.get(f"{url}/follow/v1/model", timeout=30).json()
    assert (info["version"], info["image_size"], info["resize_mode"]) == (man_b.version, 40, "squash")
    # The pinned app stayed on its version folder, well past the poll interval.
    info = httpx.get(f"{url}/pinned/v1/model", timeout=30).json()
    assert (info["version"], info["image_size"], info["resize_mode"]) == (man_a.version, 32, "center_crop")
    r = httpx.post(f"{url}/pinned/v1/score", content=queries[0], headers={"content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200 and r.json()[0]["score"] == pytest.approx(expected[man_a.version][0], abs=1e-5)
    serve.delete("follow")
    serve.delete("pinned")


def _model_replicas(app: str = "msc") -> int:
    from ray import serve

    st = serve.status().applications[app].deployments["Model"]
    return st.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_load_autoscaling_up_and_down(serving, images):
    url, scorer = serving["url"], serving["scorer"]
    expected = [r.score for r in scorer.score_bytes(images)]
    # At least 20 s of load, kept up (60 s at most) until a second replica is RUNNING: on 2 busy
    # cores a new replica takes a while to import torch and load the model.
    t_min, t_max = time.time() + 20, time.time() + 60
    stop = t_max
    stats = {"ok": 0, "5xx": 0, "wrong": 0, "other": 0}
    lock = threading.Lock()
    peak = [1]

    def client(i):
        with httpx.Client(timeout=30) as c:
            j = i
            while time.time() < stop:
                j = (j + 1) % len(images)
                r = c.post(f"{url}/v1/score", content=images[j], headers={"content-type": "image/jpeg"})
                with lock:
                    if r.status_code >= 500:
                        stats["5xx"] += 1
                    elif r.status_code != 200:
                        stats["other"] += 1
                    elif abs(r.json()[0]["score"] - expected[j]) > 1e-5:
                        stats["wrong"] += 1
                    else:
                        stats["ok"] += 1

    def watch():
        nonlocal stop
        while time.time() < stop:
            peak[0] = max(peak[0], _model_replicas())
            if peak[0] > 1 and time.time() >= t_min:
                stop = time.time()
            time.sleep(0.5)

    with ThreadPoolExecutor(33) as ex:
        futs = [ex.submit(client, i) for i in range(32)] + [ex.submit(watch)]
        for f in futs:
            f.result()
    assert stats["5xx"] == 0 and stats["wrong"] == 0 and stats["other"] == 0 and stats["ok"] > 50, stats
    from ray import serve

    assert peak[0] > 1, f"no upscale under load: {serve.status().applications['msc'].deployments['Model']}"
    deadline = time.time() + 90
    while time.time() < deadline and _model_replicas() > 1:
        time.sleep(1)
    assert _model_replicas() == 1, "no downscale after the load"


def _replica_pids(name: str) -> list[int]:
    import ray
    from ray._private import ray_constants

    raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="ignore")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == raylet and cmd.startswith(name):
                pids.append(int(d))
    return pids


def test_killed_replica_is_replaced_and_requests_are_answered(serving, images):
    """The Model replica is killed under load: requests in flight get 503 + Retry-After (never
    another 5xx), and requests are answered again once Serve has replaced it."""
    url = serving["url"]
    h = {"content-type": "image/jpeg"}
    log, stop, killed_at = [], threading.Event(), []

    def client(i):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{url}/v1/score", content=images[i], headers=h)
                log.append((time.time(), r.status_code, r.headers.get("retry-after")))
                if r.status_code != 200:
                    time.sleep(0.3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        pids = []
        for p in _replica_pids("ray::ServeReplica:msc:Model"):
            with contextlib.suppress(ProcessLookupError):  # a replica that the autoscaler just stopped
                os.kill(p, signal.SIGKILL)
                pids.append(p)
        assert pids, "no Model replica process found"
        killed_at.append(time.time())
        deadline = time.time() + 120
        while time.time() < deadline:
            after = [code for t, code, _ in log if t > killed_at[0]]
            if len(after) >= 20 and set(after[-20:]) == {200}:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = [code for _, code, _ in log]
    assert set(codes) <= {200, 503}, {c: codes.count(c) for c in set(codes)}
    assert all(ra == "1" for _, code, ra in log if code == 503)
    after = [code for t, code, _ in log if t > killed_at[0]]
    assert len(after) >= 20 and set(after[-20:]) == {200}, "requests were not answered after the replica was replaced"
    assert set(_replica_pids("ray::ServeReplica:msc:Model")).isdisjoint(pids)


def test_overload_gets_503_with_retry_after(embedded, serving, images):
    from ray import serve

    from serving.app import build_app

    serve.run(build_app({"index": embedded["out"], "allow_anonymous": True,
                         "max_batch_size": 1, "batch_wait_timeout_s": 0.0,
                         "model_options": {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                                           "ray_actor_options": {"num_cpus": 0.25}},
                         "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}),
              name="tiny", route_prefix="/tiny")
    url = serving["url"] + "/tiny"
    files = [("f", (f"{i}.jpg", images[i % len(images)], "image/jpeg")) for i in range(4)]

    def one(_):
        with httpx.Client(timeout=60) as c:
            return c.post(f"{url}/v1/score", files=files)

    with ThreadPoolExecutor(16) as ex:
        rs = list(ex.map(one, range(48)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    r503 = next(r for r in rs if r.status_code == 503)
    assert r503.headers["retry-after"] == "1" and "overloaded" in r503.json()["error"]["message"]
    serve.delete("tiny")


@pytest.mark.slow
def test_rolling_a_new_checkpoint_and_index_drops_no_request(embedded, serving, images, tmp_path):
    """reconfigure (user_config) swaps in another checkpoint + index under load, with no error."""
    import glob
    import json

    from ray import serve

    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main as embed_main
    from serving.app import build_app

    ck0 = next(os.path.dirname(m) for m in glob.glob(os.path.join(embedded["run_dir"], "checkpoint_*", "meta.json"))
               if json.load(open(m))["epoch"] == 0)
    idx0 = str(tmp_path / "idx0")
    embed_main(EmbedConfig(checkpoint=ck0, out=idx0))
    new_id = open_scorer(idx0, ck0).model_id

    def app(user_config):
        # The args' index does not exist: the replica loads only what its user_config names
        # (as with `serve deploy serving/config.yaml`, whose index is in the user_config).
        return build_app({"index": "/nonexistent/never-loaded", "allow_anonymous": True,
                          "model_options": {"num_replicas": 1, "user_config": user_config,
                                            "ray_actor_options": {"num_cpus": 0.25}},
                          "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}})

    serve.run(app({"index": embedded["out"]}), name="roll", route_prefix="/roll")
    url = serving["url"] + "/roll"
    old_id = httpx.get(f"{url}/v1/model", timeout=30).json()["model_id"]
    assert old_id != new_id
    codes, stop = [], threading.Event()

    def client(i):
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                codes.append(c.post(f"{url}/v1/score", content=images[i], headers={"content-type": "image/jpeg"}).status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    serve.run(app({"index": idx0}), name="roll", route_prefix="/roll")  # its manifest names ck0
    deadline = time.time() + 60
    while time.time() < deadline and httpx.get(f"{url}/v1/model", timeout=30).json()["model_id"] != new_id:
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert httpx.get(f"{url}/v1/model", timeout=30).json()["model_id"] == new_id
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    serve.delete("roll")
