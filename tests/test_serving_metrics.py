"""Per-detector serving metrics (serving/metrics.py) on a real local Ray Serve app: they reach
Ray's Prometheus endpoint tagged with the detector, and GET /v1/model reports the recent share of
images over the threshold next to the calibrated false-positive rate."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import free_port, noise_images, tiny_checkpoint, tiny_index

APP = "metrics"


@pytest.fixture(scope="module")
def metrics_app(local_ray, tmp_path_factory):
    from ray import serve

    from serving.app import build_app

    root = tmp_path_factory.mktemp("metrics")
    ck = tiny_checkpoint(root / "ck", image_size=32, resize_mode="squash", seed=3)
    tiny_index(root / "index", ck, {f"n{i}": b for i, b in enumerate(noise_images(12, seed=5))})
    port = free_port()
    serve.shutdown()  # a Serve left by an earlier test file would keep its own port and ignore ours
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"index": str(root / "index"), "allow_anonymous": True, "device": "cpu",
                         "model_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                         "gateway_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}),
              name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{port}/{APP}"
    serve.shutdown()


def _scrape() -> list:
    """Every sample on every alive node's metrics export endpoint."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            r = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10)
            out += [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]
    return out


def _ours(samples, name: str, **labels) -> float | None:
    """The sum of ``name``'s samples of this app with these labels (None: no such sample yet)."""
    hits = [s.value for s in samples if s.name == name and s.labels.get("application") == APP
            and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(hits) if hits else None


def test_per_detector_metrics_reach_rays_endpoint_and_the_recent_share_is_reported(metrics_app):
    images = noise_images(7, seed=9) + noise_images(3, seed=5)  # unseen noise and some of the indexed images
    files = [("file", (f"i{i}.png", b, "image/png")) for i, b in enumerate(images[:4])]
    with httpx.Client(timeout=60) as c:
        answers = [c.post(f"{metrics_app}/v1/score", files=files).json()]
        answers += [c.post(f"{metrics_app}/v1/score", content=b, headers={"content-type": "image/png"}).json()
                    for b in images[4:]]
        assert c.post(f"{metrics_app}/v1/score", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        info = c.get(f"{metrics_app}/v1/model").json()
    results = [r for a in answers for r in a]
    assert len(results) == 10 and all(r["score"] is not None for r in results)
    over = sum(r["is_anomaly"] for r in results)
    assert 0 < over < 10  # the window counts both kinds
    # The recent share, next to the calibrated false-positive rate.
    assert info["recent"] == {"window_images": 1000, "images": 10, "over_threshold": over,
                              "over_threshold_share": over / 10, "target_fpr": 0.25}

    expected = {("ray_msc_images_scored_total", ()): 10, ("ray_msc_images_over_threshold_total", ()): over,
                ("ray_msc_requests_total", ()): 8, ("ray_msc_request_errors_total", (("status", "415"),)): 1,
                ("ray_msc_image_score_count", ()): 10, ("ray_msc_request_latency_s_count", ()): 8}
    deadline, got = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        samples = _scrape()
        got = {k: _ours(samples, k[0], detector="default", **dict(k[1])) for k in expected}
        if got == expected:
            break
        time.sleep(0.5)  # the next export
    assert got == expected
    # The score histogram's buckets hold the scores (Ray rebuilds the histogram from bucket counts:
    # its _sum is made of bucket midpoints, the buckets are exact).
    from serving.metrics import SCORE_BOUNDARIES

    buckets = {float(s.labels["le"]): s.value for s in samples if s.name == "ray_msc_image_score_bucket"
               and s.labels.get("application") == APP and s.labels.get("detector") == "default"}
    scores = [r["score"] for r in results]
    assert buckets == {**{b: sum(v <= b for v in scores) for b in SCORE_BOUNDARIES}, float("inf"): 10}


def test_the_recent_window_rolls_and_keeps_a_bounded_number_of_detectors():
    from serving.metrics import DetectorMetrics

    m = DetectorMetrics(window=3, max_windows=2)
    m.scored("a", [{"score": 0.9, "is_anomaly": True}, {"score": 0.1, "is_anomaly": False},
                   {"score": None, "is_anomaly": None, "error": "not an image"}])  # no score: not in the window
    assert m.recent("a") == {"window_images": 3, "images": 2, "over_threshold": 1, "over_threshold_share": 0.5}
    m.scored("a", [{"score": 0.8, "is_anomaly": True}, {"score": 0.7, "is_anomaly": True}])
    # The oldest, True, rolled out: False, True, True remain.
    assert m.recent("a") == {"window_images": 3, "images": 3, "over_threshold": 2, "over_threshold_share": 2 / 3}
    m.scored("b", [{"score": 0.1, "is_anomaly": None}])  # no threshold: scored, but judged by nothing
    assert m.recent("b")["images"] == 0 and m.recent("b")["over_threshold_share"] is None
    m.scored("b", [{"score": 0.1, "is_anomaly": False}])
    m.scored("c", [{"score": 0.1, "is_anomaly": False}])  # a third detector: the least recently scored goes
    assert m.recent("a")["images"] == 0 and m.recent("b")["images"] == 1 and m.recent("c")["images"] == 1
