"""Serving throughput and latency over HTTP on loopback at several client concurrencies, single-
and multi-image requests, next to the offline embedding throughput of the same backbone. With
``index_shards`` N > 0: the sharded layout (serving/sharded.py), and ``max_score_diff``, the largest
|score - score of one unsharded index| over every answered image. With ``detectors`` N > 0: one
app over a registry of N detectors (multiplexed serving), requests spread over all of them, with
the replicas' cold-load seconds and LRU evictions."""

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


def _load(url: str, bodies: list[tuple[dict, int]], concurrency: int, seconds: float,
          expected: list[list[float]] | None = None) -> dict:
    """``expected``: per body, the reference score of each of its images (for max_score_diff)."""
    import httpx

    lat, errors, images, diff = [], 0, 0, 0.0
    lock, stop = threading.Lock(), time.time() + seconds

    def client(i):
        nonlocal errors, images, diff
        with httpx.Client(timeout=60) as c:
            j = i
            while time.time() < stop:
                kw, n = bodies[j % len(bodies)]
                j += 1
                kw = dict(kw)
                target = kw.pop("url", url)  # a body may name its own URL (one detector of a registry)
                t0 = time.perf_counter()
                r = c.post(target, **kw)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        images += n
                        if expected is not None:
                            got = [x["score"] for x in r.json()]
                            diff = max([diff] + [abs(g - e) for g, e in zip(got, expected[(j - 1) % len(bodies)])])
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
    out = {"concurrency": concurrency, "requests_per_s": len(lat) / wall, "images_per_s": images / wall,
           "p50_ms": q(0.5), "p99_ms": q(0.99), "errors": errors}
    if expected is not None:
        out["max_score_diff"] = diff
    return out


def _start(cpus: float) -> int:
    """Local Ray with at least ``cpus`` logical CPUs (every replica the bench asks for, even on a
    smaller machine) and Serve's HTTP proxy on a free loopback port, which it returns."""
    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True, include_dashboard=False, num_cpus=max(os.cpu_count() or 1, int(np.ceil(cpus))))
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def _replica_options(replicas: int, device: str) -> dict:
    """The app's Model and Gateway options: ``replicas`` of each (at least one Gateway), one CPU
    each (and one GPU a Model on cuda), deep queues so that the clients measure, not the queue."""
    return {"model_options": {"num_replicas": replicas, "max_ongoing_requests": 256, "max_queued_requests": -1,
                              "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}},
            "gateway_options": {"num_replicas": max(1, replicas), "ray_actor_options": {"num_cpus": 1}}}


def _resharded(index: str, n: int, workdir: str) -> str:
    """The live version of ``index`` when it has at least ``n`` shards, else a copy of it split
    into ``n`` shards (same vectors, ids, model id, k and threshold) under ``workdir``."""
    from msc_dist.index import load_index, publish, write_index

    idx = load_index(index)
    man = idx.manifest
    if len(man.shards) >= n:
        return index
    new = write_index(workdir, idx.vectors(), list(idx.ids), man.model_id, num_shards=n, factory=man.factory, k=man.k,
                      extra=man.extra)
    new.threshold, new.target_fpr = man.threshold, man.target_fpr
    publish(workdir, new)
    return workdir


def bench_serve(checkpoint: str, index: str, concurrencies: list[int], seconds: float, files_per_request: int,
                replicas: int, device: str, index_shards: int = 0, runtime: str = "torch") -> dict:
    from ray import serve

    sys.path.insert(0, os.getcwd())
    from serving.app import build_app

    from msc_dist.bench.embed_search import bench_embed
    from msc_dist.runtime import cpu_threads

    from msc_dist.checkpoint import load, resolve

    tcfg = load(resolve(os.path.expanduser(checkpoint))).config
    size, backbone = int(tcfg["image_size"]), tcfg["backbone"]
    port = _start(replicas + max(1, replicas) + 0.5 * index_shards)
    import tempfile

    tmp = tempfile.TemporaryDirectory()
    index = os.path.expanduser(index)
    sharding, options = {}, _replica_options(replicas, device)
    if index_shards > 0:
        index = _resharded(index, index_shards, tmp.name)
        sharding = {"index_shards": index_shards, "shard_options": {"ray_actor_options": {"num_cpus": 0.5}}}
    serve.run(build_app({"checkpoint": checkpoint, "index": index, "device": device, "runtime": runtime,
                         "max_files": max(16, files_per_request),
                         "allow_anonymous": True, **sharding,  # loopback only: throughput, not auth
                         **options}),
              name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/score"
    imgs = _images(32, max(96, size))
    single = [({"content": b, "headers": {"content-type": "image/jpeg"}}, 1) for b in imgs]
    multi = [({"files": [("f", (f"{i}.jpg", imgs[(j + i) % len(imgs)], "image/jpeg")) for i in range(files_per_request)]},
              files_per_request) for j in range(8)]
    exp_single = exp_multi = None
    if index_shards > 0:  # the reference: one unsharded index of the same version, in this process
        from msc_dist.scorer import open_scorer

        ref = [r.score for r in open_scorer(index, checkpoint).score_bytes(imgs)]
        exp_single = [[x] for x in ref]
        exp_multi = [[ref[(j + i) % len(imgs)] for i in range(files_per_request)] for j in range(8)]
    _load(url, single, 2, 2.0)  # warm-up
    res = {"single": [_load(url, single, c, seconds, exp_single) for c in concurrencies],
           "multi": [_load(url, multi, c, seconds, exp_multi) for c in concurrencies]}
    serve.shutdown()
    tmp.cleanup()
    offline = bench_embed(backbone, size, 64, device, 512, 2, runtimes=[runtime])
    best = max(res["multi"], key=lambda r: r["images_per_s"])
    out = {"bench": "serve", "runtime": runtime, "backbone": backbone, "image_size": size, "device": offline["device"], "replicas": replicas,
           "index_shards": index_shards, "files_per_request": files_per_request,
           "images_per_s": best["images_per_s"], "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"], **res,
           "offline_embed_images_per_s": offline["images_per_s"], "multi_over_offline": best["images_per_s"] / offline["images_per_s"],
           # what each side may use: a Model replica its reserved CPUs (its forward's threads), the
           # offline embedding every CPU of this process (README: "What limits serving here")
           "model_cpus_per_replica": options["model_options"]["ray_actor_options"]["num_cpus"],
           "offline_cpus": cpu_threads()}
    if index_shards > 0:
        runs = res["single"] + res["multi"]
        out["max_score_diff"] = max(r["max_score_diff"] for r in runs if r["requests_per_s"] > 0)
    return out


def _registry_of(checkpoint: str, index: str, n: int, workdir: str) -> list[str]:
    """A registry under ``workdir`` of ``n`` detectors, det-0 .. det-{n-1}: each its own copy of
    the checkpoint folder (so each replica loads its model card afresh) and the live version of
    ``index`` published for it (same vectors, ids, k and threshold)."""
    import shutil

    from msc_dist import registry
    from msc_dist.checkpoint import resolve
    from msc_dist.index import load_index, publish, write_index

    idx = load_index(os.path.expanduser(index))
    man = idx.manifest
    src = resolve(os.path.expanduser(checkpoint))
    names = []
    for i in range(n):
        ck = os.path.join(workdir, "checkpoints", f"det-{i}")
        shutil.copytree(src, ck)
        root = registry.root(os.path.join(workdir, "registry"), f"det-{i}")
        new = write_index(root, idx.vectors(), list(idx.ids), man.model_id, factory=man.factory, k=man.k,
                          extra={**man.extra, "checkpoint": ck})
        new.threshold, new.target_fpr = man.threshold, man.target_fpr
        publish(root, new)
        names.append(f"det-{i}")
    return names


def bench_serve_detectors(checkpoint: str, index: str, detectors: int, max_per_replica: int, concurrencies: list[int],
                          seconds: float, replicas: int, device: str, runtime: str = "torch") -> dict:
    """Single-image requests spread evenly over ``detectors`` detectors of one multiplexed app."""
    import tempfile

    from ray import serve

    sys.path.insert(0, os.getcwd())
    from serving.app import build_app

    from msc_dist.checkpoint import load, resolve

    tcfg = load(resolve(os.path.expanduser(checkpoint))).config
    size, backbone = int(tcfg["image_size"]), tcfg["backbone"]
    tmp = tempfile.TemporaryDirectory()
    names = _registry_of(checkpoint, index, detectors, tmp.name)
    port = _start(replicas + max(1, replicas))
    serve.run(build_app({"registry": os.path.join(tmp.name, "registry"), "max_detectors_per_replica": max_per_replica,
                         "device": device, "runtime": runtime, "allow_anonymous": True, "request_timeout_s": 60,
                         **_replica_options(replicas, device)}),
              name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}/v1/detectors"
    imgs = _images(32, max(96, size))
    bodies = [({"url": f"{base}/{names[j % len(names)]}/score", "content": imgs[j % len(imgs)],
                "headers": {"content-type": "image/jpeg"}}, 1) for j in range(max(len(names), len(imgs)))]
    # Warm-up: the Gateway and the Model up, then one request to each detector that the replicas can
    # hold together, so that the timed runs see the steady state (loads only where the set exceeds it).
    warm = min(len(names), replicas * max_per_replica)
    for name in names[:warm]:
        _load(f"{base}/{name}/score", [b for b in bodies if b[0]["url"].endswith(f"/{name}/score")][:1], 1, 0.5)
    model = serve.get_deployment_handle("Model", app_name="bench")

    def replica_stats() -> dict:
        stats = {}
        for _ in range(50 * max(1, replicas)):
            s = model.stats.remote().result(timeout_s=60)
            stats[s["replica"]] = s
            if len(stats) >= replicas:
                break
        return stats

    before = replica_stats()
    runs = [_load(base, bodies, c, seconds) for c in concurrencies]
    stats = replica_stats()
    serve.shutdown()
    tmp.cleanup()
    for key in ("loads", "evictions"):  # the timed runs' own
        for r, s in stats.items():
            s[f"run_{key}"] = s[key] - before.get(r, {}).get(key, 0)
    loads = sum(s["loads"] for s in stats.values())
    best = max(runs, key=lambda r: r["images_per_s"])
    return {"bench": "serve", "detectors": detectors, "max_detectors_per_replica": max_per_replica, "replicas": replicas,
            "runtime": runtime, "backbone": backbone, "image_size": size, "device": device,
            "images_per_s": best["images_per_s"], "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"],
            "cold_load_s": sum(s["load_s"] for s in stats.values()) / loads if loads else None,
            "loads": loads, "evictions": sum(s["evictions"] for s in stats.values()),
            "warmed_detectors": warm, "run_loads": sum(s["run_loads"] for s in stats.values()),
            "run_evictions": sum(s["run_evictions"] for s in stats.values()),
            "errors": sum(r["errors"] for r in runs), "runs": runs}
