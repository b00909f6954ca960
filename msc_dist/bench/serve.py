"""Serving throughput and latency over HTTP on loopback at several client concurrencies, single-
and multi-image requests, next to the offline embedding throughput of the same backbone."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import numpy as np


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, size: int) -> list[bytes]:
    from msc_dist.data.demo import encode_jpeg, texture

    rng = np.random.default_rng(0)
    return [encode_jpeg(texture(rng, size)) for _ in range(n)]


def _load(url: str, bodies: list[tuple[dict, int]], concurrency: int, seconds: float) -> dict:
    import httpx

    lat, errors, images = [], 0, 0
    lock, stop = threading.Lock(), time.time() + seconds

    def client(i):
        nonlocal errors, images
        with httpx.Client(timeout=60) as c:
            j = i
            while time.time() < stop:
                kw, n = bodies[j % len(bodies)]
                j += 1
                t0 = time.perf_counter()
                r = c.post(url, **kw)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        images += n
                    else:
                        errors += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = (lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: float("nan"))
    return {"concurrency": concurrency, "requests_per_s": len(lat) / wall, "images_per_s": images / wall,
            "p50_ms": q(0.5), "p99_ms": q(0.99), "errors": errors}


def bench_serve(checkpoint: str, index: str, concurrencies: list[int], seconds: float, files_per_request: int,
                replicas: int, device: str) -> dict:
    import ray
    from ray import serve

    sys.path.insert(0, os.getcwd())
    from serving.app import build_app

    from msc_dist.bench.embed_search import bench_embed

    from msc_dist.checkpoint import load, resolve

    tcfg = load(resolve(os.path.expanduser(checkpoint))).config
    size, backbone = int(tcfg["image_size"]), tcfg["backbone"]
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gpu = device == "cuda"
    # On loopback only: the benchmark measures throughput, not auth.
    serve.run(build_app({"checkpoint": checkpoint, "index": index, "device": device, "max_files": max(16, files_per_request),
                         "allow_anonymous": True,
                         "model_options": {"num_replicas": replicas, "max_ongoing_requests": 256, "max_queued_requests": -1,
                                           "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if gpu else 0}},
                         "gateway_options": {"num_replicas": max(1, replicas), "ray_actor_options": {"num_cpus": 1}}}),
              name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/score"
    imgs = _images(32, max(96, size))
    single = [({"content": b, "headers": {"content-type": "image/jpeg"}}, 1) for b in imgs]
    multi = [({"files": [("f", (f"{i}.jpg", imgs[(j + i) % len(imgs)], "image/jpeg")) for i in range(files_per_request)]},
              files_per_request) for j in range(8)]
    _load(url, single, 2, 2.0)  # warm-up
    res = {"single": [_load(url, single, c, seconds) for c in concurrencies],
           "multi": [_load(url, multi, c, seconds) for c in concurrencies]}
    serve.shutdown()
    offline = bench_embed(backbone, size, 64, device, 512, 2)
    best_multi = max(r["images_per_s"] for r in res["multi"])
    return {"bench": "serve", "backbone": backbone, "image_size": size, "device": offline["device"], "replicas": replicas,
            "files_per_request": files_per_request, **res, "offline_embed_images_per_s": offline["images_per_s"],
            "multi_over_offline": best_multi / offline["images_per_s"]}
