"""Fail-closed behaviour of the service and the jobs (issue 14), on real components without a
Serve cluster: the real Gateway class, real images in every format Pillow writes,
real checkpoints from the shared training run, a real local Ray started in a subprocess, and a
real Ray Train worker group that stalls. The HTTP side is in test_serving.py.

Imports of the code under test sit inside the tests, so that each test fails on its own against
code without the feature."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the serving/ folder at the repo root


def _encoded(fmt: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buf, format=fmt)
    return buf.getvalue()


# Formats Pillow can write here; EPS needs Ghostscript to write, its magic bytes suffice to read.
OTHER_FORMATS = ["BMP", "TIFF", "GIF", "ICO", "TGA", "PCX", "SGI", "DDS", "QOI", "IM", "PPM"]


def test_decoder_accepts_only_jpeg_png_webp_by_default():
    """Item 2: no other format reaches a decoder, unless the allow-list names it."""
    from msc_dist.data.decode import BadImage, decode_image

    for fmt in ("JPEG", "PNG", "WEBP"):
        assert decode_image(_encoded(fmt), 16, resize_mode="squash").shape == (16, 16, 3), fmt
    for fmt in OTHER_FORMATS + ["EPS"]:
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" if fmt == "EPS" else _encoded(fmt)
        with pytest.raises(BadImage) as e:
            decode_image(data, 16, resize_mode="squash")
        assert "JPEG, PNG, WEBP" in str(e.value), (fmt, str(e.value))  # names the accepted formats
    with pytest.raises(BadImage, match="TIFF images are not accepted"):
        decode_image(_encoded("TIFF"), 16, resize_mode="squash")
    # Configurable: an explicit allow-list lets BMP through.
    assert decode_image(_encoded("BMP"), 16, formats=("JPEG", "BMP"), resize_mode="squash").shape == (16, 16, 3)


def test_offline_scorer_gives_an_error_row_for_other_formats(embedded):
    """Item 2, offline: the Scorer (used by the score job) returns an error, not a score."""
    from msc_dist.scorer import open_scorer

    scorer = open_scorer(embedded["out"], embedded["checkpoint"])
    ok, bmp = scorer.score_bytes([_encoded("PNG", (64, 64)), _encoded("BMP", (64, 64))])
    assert ok.error is None and ok.score is not None
    assert bmp.score is None and "BMP images are not accepted" in bmp.error


async def _gateway(**settings):
    """The real Gateway class, constructed as a Serve replica would (its __init__ is async)."""
    from serving.app import Gateway

    cls = Gateway.func_or_class
    g = cls.__new__(cls)
    await cls.__init__(g, None, **settings)
    return g


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_gateway_refuses_to_start_without_a_key(tmp_path, monkeypatch):
    """Item 1: no key and no allow_anonymous, or a key file that is missing or empty, stop the
    replica; the auth mode is logged at start."""
    monkeypatch.delenv("MSC_TEST_UNSET_KEY", raising=False)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    refused = [{"api_key_env": "MSC_TEST_UNSET_KEY"},
               {"api_key_env": "MSC_TEST_UNSET_KEY", "allow_anonymous": False},
               {"api_key_env": "MSC_TEST_UNSET_KEY", "api_key_file": str(tmp_path / "missing")},
               {"api_key_env": "MSC_TEST_UNSET_KEY", "api_key_file": str(empty)}]
    for settings in refused:
        with pytest.raises(ValueError, match="allow_anonymous|does not exist|is empty"):
            asyncio.run(_gateway(**settings))
    key = tmp_path / "key"
    key.write_text("k3y\n")
    serve_log, records = logging.getLogger("ray.serve"), _Records()  # Serve's logger does not propagate
    level = serve_log.level
    serve_log.addHandler(records)
    serve_log.setLevel(logging.INFO)
    try:
        assert asyncio.run(_gateway(api_key_file=str(key))).api_key == "k3y"
        monkeypatch.setenv("MSC_TEST_SET_KEY", "from-env")
        assert asyncio.run(_gateway(api_key_env="MSC_TEST_SET_KEY")).api_key == "from-env"
        assert asyncio.run(_gateway(api_key_env="MSC_TEST_UNSET_KEY", allow_anonymous=True)).api_key is None
    finally:
        serve_log.removeHandler(records)
        serve_log.setLevel(level)
    logged = "\n".join(records.lines)
    assert "API key required" in logged and "ANONYMOUS" in logged, logged


def test_building_the_app_without_a_key_fails_with_the_reason(monkeypatch):
    """`serve run serving/config.yaml` with no key: the builder refuses, naming what to set, instead
    of a Gateway whose replicas fail and are retried; a value out of range is named too."""
    from msc_dist.config import ConfigError
    from serving.app import build_app

    monkeypatch.delenv("MSC_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="no API key.*allow_anonymous"):
        build_app({"api_key_env": "MSC_TEST_UNSET_KEY"})
    with pytest.raises(ConfigError, match=r"max_files must be in \[1, 1024\], got 0"):
        build_app({"allow_anonymous": True, "max_files": 0})
    with pytest.raises(ConfigError, match="unknown key.*allow_anonymous"):
        build_app({"allow_anonymus": "true"})
    assert type(build_app({"api_key_env": "MSC_TEST_UNSET_KEY", "allow_anonymous": "true"})).__name__ == "Application"


def _copy_run(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run, ignore=shutil.ignore_patterns("serving"))
    return run


def test_only_registered_checkpoints_with_matching_sums_load(trained_run, tmp_path):
    """Item 6: a run folder resolves to the checkpoint Ray Train registered last, not to the
    highest epoch on disk; a file that does not match its sha256 is refused."""
    from msc_dist import checkpoint as ckpt

    run = _copy_run(trained_run, tmp_path)
    registered = ckpt.resolve(str(run))
    assert os.path.basename(registered) == os.path.basename(trained_run["checkpoint"])
    assert ckpt.load(registered).meta["epoch"] == 1
    # A folder Ray never registered (a stray copy, an upload still under way) with a higher epoch.
    stray = run / "checkpoint_9999-12-31_23-59-59.999999"
    shutil.copytree(registered, stray)
    meta = json.loads((stray / "meta.json").read_text())
    (stray / "meta.json").write_text(json.dumps({**meta, "epoch": 99}))
    assert ckpt.resolve(str(run)) == registered
    with pytest.raises(ValueError, match="sha256"):  # and taken explicitly, its meta.json fails its sum
        ckpt.load(str(stray))
    model = Path(registered) / "model.pt"
    model.write_bytes(model.read_bytes()[:-100])  # truncated, as a partial upload would be
    with pytest.raises(ValueError, match="sha256"):
        ckpt.load(registered)


def test_scorer_takes_the_checkpoint_recorded_in_the_index(embedded):
    """Item 6: with no checkpoint, the Scorer (and serving) use the one that built the index."""
    from msc_dist.scorer import open_scorer

    s = open_scorer(embedded["out"])
    assert s.model_id == open_scorer(embedded["out"], embedded["checkpoint"]).model_id
    assert "checkpoint" not in s.info()  # /v1/model shows no storage URI


def test_init_ray_sends_no_credentials_in_the_runtime_env(monkeypatch):
    """Item 7: what init_ray hands to ray.init when it joins a cluster: never credentials (the
    dashboard shows a runtime env); inside a submitted job no runtime env at all (the job's own
    applies, and the same variable sent twice is a conflict that stops the job)."""
    import ray

    from msc_dist.ray_env import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    monkeypatch.setenv("MSC_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-value")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with socket.socket() as head:  # something that answers, standing in for a cluster's GCS
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        init_ray(address)  # a driver joining a cluster directly
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
            {"runtime_env": {"env_vars": {"MSC_S3_ENDPOINT_URL": "http://127.0.0.1:9"}}}))
        init_ray()  # the driver of `ray job submit --runtime-env-json ...`
    direct, submitted = calls
    env = (direct.get("runtime_env") or {}).get("env_vars", {})
    assert direct["address"] == address and env.get("MSC_S3_ENDPOINT_URL") == "http://127.0.0.1:9"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env), env
    assert "secret-value" not in json.dumps(direct)
    assert submitted["address"] == address and not submitted.get("runtime_env"), submitted


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_no_address_starts_a_local_ray_and_a_dead_address_fails_fast():
    """Item 9: Ray's "current cluster" file names a cluster that died: with no address the job
    still starts a local Ray (a bare ray.init() would try to join the dead one for minutes);
    an address given explicitly that does not answer fails in seconds with a clear message."""
    dead = f"127.0.0.1:{_closed_port()}"
    tmp = tempfile.mkdtemp(prefix="msc9-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(dead)
        script = f"""
import time, ray
from msc_dist.ray_env import init_ray
init_ray()
print("LOCAL", ray.get_runtime_context().gcs_address, flush=True)
ray.shutdown()
t = time.time()
try:
    init_ray({dead!r})
except ConnectionError as e:
    print("FAILED_FAST", round(time.time() - t, 1), e, flush=True)
"""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MSC_S3_ENDPOINT_URL")}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
        try:
            r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                               cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"init_ray hung: {(e.stdout or b'')[-2000:]!r} {(e.stderr or b'')[-2000:]!r}") from None
        out = r.stdout
        assert "LOCAL" in out and dead not in out.split("LOCAL", 1)[1].split("\n", 1)[0], (out, r.stderr[-3000:])
        assert "FAILED_FAST" in out and "ray start --head" in out, (out, r.stderr[-3000:])
        assert float(out.split("FAILED_FAST", 1)[1].split()[0]) < 15
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_stalled_rank_fails_the_group_after_the_collective_timeout(local_ray, demo_data, tmp_path, monkeypatch):
    """Item 10: rank 1 stalls (as on a hung storage read) before an all-reduce; rank 0 gives up
    after --collective-timeout-s, not after torch's 30 minutes, and the run fails."""
    import msc_dist.train.job as train_job
    from msc_dist.train.config import TrainConfig
    main = train_job.main

    def stalling_fn(config):  # nested: pickled by value into the Ray Train workers
        import time as _time

        import ray.train
        import torch
        import torch.distributed as dist

        if ray.train.get_context().get_world_rank() == 1:
            _time.sleep(300)
        dist.all_reduce(torch.zeros(1))

    monkeypatch.setattr(train_job, "ray_train_fn", stalling_fn)
    cfg = TrainConfig(data=str(demo_data / "train"), normal_classes=["normal"], epochs=1, image_size=32, batch_size=8,
                      num_workers=2, loader_workers=0, storage_path=str(tmp_path / "runs"), name="stall",
                      max_failures=0, collective_timeout_s=5)
    t = time.time()
    with pytest.raises(Exception) as e:
        main(cfg)
    elapsed = time.time() - t
    assert elapsed < 150, elapsed  # without the timeout rank 0 waits for rank 1's 300 s
    assert "timed out" in str(e.value).lower() or "timeout" in str(e.value).lower(), str(e.value)[-2000:]
