"""End-to-end training on a real local Ray (two CPU workers, gloo), real shards, real S3 server."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import torch

from msc_dist import storage
from msc_dist.backbones import build_model
from msc_dist.data.loader import LabelFilter, ShardStream, kept_counts, make_loader
from msc_dist.data.plan import steps_per_epoch
from msc_dist.data.shards import ShardWriter, describe
from msc_dist.features import embed_batches
from msc_dist.train.center import global_center
from msc_dist.train.config import TrainConfig
from msc_dist.train.job import main
from test_data import _jpeg, write_shards

SMALL = dict(image_size=32, batch_size=4, num_workers=2, loader_workers=1, cpus_per_worker=1, lr=1e-4)


def _checkpoints(run_dir: str) -> dict[int, str]:
    """epoch -> checkpoint folder (local runs)."""
    out = {}
    for meta in glob.glob(os.path.join(run_dir, "checkpoint_*", "meta.json")):
        out[json.load(open(meta))["epoch"]] = os.path.dirname(meta)
    return out


def test_uneven_shards_exact_center_equal_steps_and_corrupt_skipped(local_ray, tmp_path):
    data = tmp_path / "data"
    keys = write_shards(data, [7, 20, 33], corrupt={"k000010"})
    cfg = TrainConfig(data=str(data), epochs=1, storage_path=str(tmp_path / "runs"), name="uneven", **SMALL)
    out = main(cfg)
    assert out.error is None

    m = out.metrics
    n_steps = steps_per_epoch(len(keys), 2, 4)
    assert m["epoch"] == 1 and m["rank_steps"] == [n_steps, n_steps] and n_steps > 0

    ckpts = _checkpoints(out.run_dir)
    meta0 = json.load(open(os.path.join(ckpts[0], "meta.json")))
    # Ranks hold 30 + 30 planned samples; the corrupt one is skipped, counted, not padded over.
    assert meta0["rank_center_samples"] == [29, 30] and meta0["center_samples"] == 59
    assert meta0["corrupt_skipped"] == 1
    center = torch.load(os.path.join(ckpts[0], "center.pt"), weights_only=True)

    # The same center computed in one process over all shards.
    model = build_model("efficientnet_lite0").eval()
    counts = kept_counts(describe(str(data)), LabelFilter(frozenset({0})))
    stream = ShardStream(counts, LabelFilter(frozenset({0})), 32, 16, resize_mode=cfg.resize_mode)  # the center's view
    emb = embed_batches(model, make_loader(stream, 0), torch.device("cpu"))
    ref, n = global_center(emb.z)
    assert n == 59
    assert torch.allclose(center, ref, atol=1e-6), (center - ref).abs().max()
    # Center and config are in every checkpoint; model.pt loads safely.
    for d in ckpts.values():
        assert torch.equal(torch.load(os.path.join(d, "center.pt"), weights_only=True), center)
        assert json.load(open(os.path.join(d, "config.json")))["batch_size"] == 4
        torch.load(os.path.join(d, "model.pt"), weights_only=True)
    assert json.load(open(os.path.join(out.run_dir, "config.json")))["name"] == "uneven"

    # The corrupt key is in the workers' logs.
    logs = glob.glob(os.path.join(_session_dir(), "logs", "*"))
    assert any("k000010" in open(f, errors="ignore").read() for f in logs if os.path.isfile(f))


def _session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


@pytest.mark.slow
def test_collapse_stop_leaves_the_last_good_epoch_registered_and_the_bad_one_apart(local_ray, tmp_path, capsys):
    """on_collapse stop in a Ray Train run: the stopped epoch reports no checkpoint, so the run's
    registered checkpoint (what resolve(run) and the embedding job pick) stays the last good
    epoch's; the bad epoch's checkpoint is kept apart in the run folder's collapsed/, marked. (The
    absolute alarm set below any cosine fires at epoch 1; the relative one has its in-process test.)"""
    from msc_dist import checkpoint as ckpt

    data = tmp_path / "data"
    write_shards(data, [16, 16])
    cfg = TrainConfig(data=str(data), epochs=3, storage_path=str(tmp_path / "runs"), name="collapse",
                      collapse_cos=-1.0, on_collapse="stop", collapse_rise=0.0, **SMALL)
    out = main(cfg)
    assert out.error is None and out.metrics["epoch"] == 1 and out.metrics["stopped"] is True
    assert out.metrics["collapsed"] is True and out.metrics["checkpoint_epoch"] == 0
    registered = ckpt.resolve(out.run_dir)
    assert ckpt.load(registered).meta["epoch"] == 0 and os.path.samefile(registered, out.checkpoint)
    assert sorted(_checkpoints(out.run_dir)) == [0]  # no Ray checkpoint folder for the bad epoch
    apart = ckpt.collapsed_url(out.run_dir, 1)
    assert out.metrics["collapsed_checkpoint"] == apart
    bad = ckpt.load(apart)
    assert bad.meta["epoch"] == 1 and bad.meta["collapsed"] is True and bad.config["on_collapse"] == "stop"
    printed = capsys.readouterr()
    assert f"kept apart in {apart}; the run's checkpoint stays epoch 0" in printed.out + printed.err


@pytest.mark.slow
def test_s3_shards_and_checkpoints_resume_on_rerun(local_ray, s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="msc-test")
    with ShardWriter("s3://msc-test/data/train", per_shard=12) as w:
        for i in range(40):
            w.write(f"s{i:04d}", _jpeg(i), "jpg", 0)
    with ShardWriter("s3://msc-test/data/eval", per_shard=12) as w:
        for i in range(16):
            w.write(f"e{i:04d}", _jpeg(1000 + i), "jpg", int(i % 2))
    cfg = TrainConfig(data="s3://msc-test/data/train", eval_data="s3://msc-test/data/eval", epochs=1,
                      storage_path="s3://msc-test/runs", name="s3run", **SMALL)
    first = main(cfg)
    assert first.metrics["epoch"] == 1 and first.checkpoint.startswith("s3://msc-test/runs/s3run/")
    assert 0.0 <= first.metrics["roc_auc"] <= 1.0
    fs = storage.filesystem("s3://msc-test")
    assert fs.exists("msc-test/runs/s3run/config.json")
    with storage.open_file(first.checkpoint + "/model.pt") as f:
        import io

        torch.load(io.BytesIO(f.read()), weights_only=True)

    second = main(TrainConfig(**{**cfg.__dict__, "epochs": 2}))
    assert second.metrics["epoch"] == 2
    assert second.metrics["start_epoch"] == 1  # resumed from the S3 checkpoint, not retrained
    assert second.metrics["step"] == 2 * first.metrics["step"]


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(local_ray, tmp_path):
    data = tmp_path / "data"
    write_shards(data, [40, 40])
    cfg = TrainConfig(data=str(data), epochs=5, storage_path=str(tmp_path / "runs"), name="killed",
                      max_failures=2, **SMALL)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("out", main(cfg)), daemon=True)
    t.start()
    run_dir = os.path.join(cfg.storage_path, cfg.name)
    deadline = time.time() + 240
    # A checkpoint folder on disk is not yet one Ray resumes from: the controller registers reports
    # when it polls the workers (slower on a loaded machine), and records them in its snapshot.
    while time.time() < deadline and max(_registered_epochs(run_dir), default=-1) < 1:
        time.sleep(0.2)
    assert max(_registered_epochs(run_dir), default=-1) >= 1, "no registered epoch-1 checkpoint appeared"
    workers = _train_worker_pids()
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive(), "training did not finish after the worker was killed"
    m = result["out"].metrics
    assert m["epoch"] == 5
    assert 1 <= m["start_epoch"] < 5  # resumed from a checkpoint, not restarted from scratch


def _registered_epochs(run_dir: str) -> list[int]:
    """Epochs of the checkpoints Ray Train's controller has registered (its snapshot file)."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            snap = json.load(f)
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
    return [int(r["metrics"]["epoch"]) for r in snap.get("checkpoint_results", []) if "epoch" in r.get("metrics", {})]


def _train_worker_pids() -> list[int]:
    """PIDs of this Ray's training worker processes: children of our raylet titled ray::RayTrainWorker."""
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="ignore")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == raylet and cmd.startswith("ray::RayTrainWorker"):
            pids.append(int(d))
    return sorted(pids)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "msc_dist.train", *args], capture_output=True, text=True, timeout=timeout)


def test_no_data_and_no_normal_samples_fail_before_any_worker(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("--data", str(tmp_path / "empty"), "--storage-path", str(tmp_path / "runs"))
    assert r.returncode == 2 and "holds no .tar shards" in r.stderr
    write_shards(tmp_path / "anom", [6], label_fn=lambda i: 1)
    r = _cli("--data", str(tmp_path / "anom"), "--storage-path", str(tmp_path / "runs"))
    assert r.returncode == 2 and "no normal samples" in r.stderr and "{1: 6}" in r.stderr
    for out in (r.stdout, r.stderr):
        assert "Started training worker group" not in out and "Started a local Ray" not in out


def test_embedded_default_runs_the_demo_end_to_end(tmp_path):
    """The quickstart path: no --data -> demo set generated, local Ray started in-process."""
    r = _cli("--epochs", "1", "--image-size", "32", "--batch-size", "8", "--loader-workers", "0",
             "--demo-dir", str(tmp_path / "demo"), "--storage-path", str(tmp_path / "runs"), "--name", "demo")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout[r.stdout.rindex("\n{") :])
    assert res["metrics"]["epoch"] == 1 and res["metrics"]["roc_auc"] > 0.5
    assert os.path.exists(os.path.join(res["checkpoint"], "model.pt"))
    # Output a person can read: one line per epoch, no worker or Ray lines, a short console
    # (a progress bar redrawn with \r counts as one line).
    lines = [ln for ln in (r.stdout + r.stderr).split("\n") if ln.strip()]
    assert len(lines) <= 40, "\n".join(lines)
    assert [ln.split(" |")[0] for ln in r.stdout.split("\n") if re.match(r"epoch \d+ \|", ln)] == ["epoch 0", "epoch 1"]
    # progress bars with rate and ETA on the center pass and the steps (each one line, redrawn with \r)
    assert any(ln.startswith("center pass:") and "img/s" in ln for ln in lines), lines
    assert any(ln.startswith("epoch 1:") and "step" in ln for ln in lines), lines
    assert not [ln for ln in lines if "RayTrainWorker" in ln or "(pid=" in ln or "Warning" in ln], lines
