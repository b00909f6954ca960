"""Shared fixtures: real shards on disk, a local Ray, and a real S3-compatible server (moto in
server mode) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} is absent (the shared data sets live beside the checkout, not in it)")
    return p


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from msc_dist.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    make_demo(str(root), n_train=96, n_test_normal=24, n_test_defect=24, size=48, per_shard=40)
    return root


_LOGGER_REPAIRS: list[str] = []


@pytest.fixture(autouse=True)
def _our_loggers_as_a_fresh_process_has_them(request):
    """Our msc_dist.* loggers as a fresh process has them before each test (enabled, propagating,
    no level above INFO): in the full suite something an earlier test ran leaves them unable to
    reach pytest's capture, and then a test that asserts a logged line (a counted mask skip) sees
    nothing, although the product logs it. Each repair is listed at the end of the run with the
    test it was found before, to find what did it."""
    import logging

    found = []
    for n, lg in list(logging.Logger.manager.loggerDict.items()):
        if (n == "msc_dist" or n.startswith("msc_dist.")) and isinstance(lg, logging.Logger):
            what = [w for w, bad in (("disabled", lg.disabled), ("propagate=False", not lg.propagate),
                                     (f"level {logging.getLevelName(lg.level)}", lg.level > logging.INFO)) if bad]
            if what:
                found.append(f"{n} ({', '.join(what)})")
                lg.disabled, lg.propagate = False, True
                if lg.level > logging.INFO:
                    lg.setLevel(logging.NOTSET if n != "msc_dist" else logging.INFO)
    masks = sys.modules.get("msc_dist.data.masks")
    if masks is not None:
        lg = masks.log
        if lg is not logging.getLogger(lg.name):
            found.append(f"{lg.name}: the module's logger is not the registered one")
        if not lg.isEnabledFor(logging.WARNING):
            found.append(f"{lg.name}: not enabled for WARNING (effective level "
                         f"{logging.getLevelName(lg.getEffectiveLevel())})")
            logging.Logger.manager._clear_cache()
        c, chain = lg, []
        while c is not None:
            chain.append(c)
            c = c.parent if c.propagate else None
        if chain[-1] is not logging.getLogger():
            found.append(f"{lg.name}: its chain ends at {chain[-1].name!r}, not the root logger")
    if logging.root.manager.disable:
        found.append(f"logging.disable({logging.root.manager.disable})")
        logging.disable(logging.NOTSET)
    if found:
        _LOGGER_REPAIRS.append(f"{request.node.nodeid}: {'; '.join(sorted(found))}")
    yield


def pytest_terminal_summary(terminalreporter):
    if _LOGGER_REPAIRS:
        terminalreporter.write_sep("-", "msc_dist loggers found disabled (repaired) before")
        for line in _LOGGER_REPAIRS[:5]:
            terminalreporter.write_line(line)


def free_port() -> int:
    """A free TCP port on loopback (shared by the tests that start servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server as a separate process on loopback; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    old = {k: os.environ.get(k) for k in ("MSC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(MSC_S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """One local Ray for the session (started after the S3 env is set, so workers inherit it)."""
    import ray

    # Serve's autoscaling metrics every 0.5 s (default 10 s), so the autoscaling test sees a decision in time.
    for k in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ[k] = "0.5"
    # Metrics reach the nodes' Prometheus endpoints every second (Ray's floor; default 10 s), so that
    # the metrics test polls for seconds, not tens of them.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    env = {k: os.environ[k] for k in ("MSC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION", "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                                      "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S")}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_run(local_ray, tmp_path_factory):
    """One short real training run on demo data, shared by the embedding/scoring/serving tests."""
    from msc_dist.data.demo import make_demo
    from msc_dist.train.config import TrainConfig
    from msc_dist.train.job import main

    root = tmp_path_factory.mktemp("trained")
    make_demo(str(root / "demo"), n_train=96, n_test_normal=8, n_test_defect=8, size=64, per_shard=40)
    # resize_mode squash, not the default center_crop: the embedding, scoring and serving tests
    # check that every path follows the checkpoint's mode rather than the default.
    cfg = TrainConfig(data=str(root / "demo" / "train"), epochs=1, image_size=64, batch_size=8, num_workers=2,
                      loader_workers=0, lr=1e-4, storage_path=str(root / "runs"), name="shared", resize_mode="squash")
    out = main(cfg)
    assert out.error is None
    return {"root": root, "run_dir": out.run_dir, "checkpoint": out.checkpoint, "data": cfg.data}


@pytest.fixture(scope="session")
def embedded(trained_run, tmp_path_factory):
    """The shared run embedded and indexed (3 shards, 20 % held out for the threshold)."""
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main as embed_main

    out = tmp_path_factory.mktemp("embedded")
    res = embed_main(EmbedConfig(checkpoint=trained_run["run_dir"], out=str(out), num_shards=3, batch_size=16,
                                 rows_per_task=8, rows_per_file=32,
                                 calibration_fraction=0.2, target_fpr=0.05))
    return {**trained_run, "out": str(out), "result": res}


def tiny_checkpoint(folder, *, image_size: int, resize_mode: str, seed: int = 0, data: str | None = None,
                    **config) -> str:
    """A 0-epoch checkpoint written in-process (tiny_cnn, weights perturbed by ``seed`` so that
    each seed is another model id), with the given model card (and ``config``'s training-config
    entries): no Ray Train run."""
    import torch

    from msc_dist import checkpoint as ckpt
    from msc_dist.backbones import build_model

    folder = str(folder)
    model = build_model("tiny_cnn")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    center = torch.nn.functional.normalize(torch.ones(model.dim), dim=0)
    ckpt.save(folder, model.state_dict(), center, {"backbone": "tiny_cnn", "image_size": image_size,
                                                   "resize_mode": resize_mode, "data": data, "normal_classes": ["0"],
                                                   **config},
              {"epoch": 0})
    return folder


def tiny_index(out, checkpoint: str, images: dict[str, bytes], **kw):
    """An index version of ``images`` embedded in-process by the checkpoint's card, published
    into ``out`` as the embedding job publishes (the first few also calibrate a threshold)."""
    from msc_dist.card import index_record, load_card
    from msc_dist.index import write_index

    card = load_card(checkpoint)
    z = card.embed_arrays([card.preprocess(b) for b in images.values()])
    return write_index(str(out), z, list(images), card.model_id, calibration=z[:4], target_fpr=0.25,
                       extra=index_record(card.checkpoint, card.config), **kw)


def noise_images(n: int, w: int = 48, h: int = 32, seed: int = 0, fmt: str = "PNG") -> list[bytes]:
    """Non-square images with a bright left edge: squash keeps it, center_crop cuts it off."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[:, : w // 6] = 250
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out
