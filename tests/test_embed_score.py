"""Embedding job, index and offline scoring on a real local Ray, real demo images, real S3 server."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from msc_dist import storage
from msc_dist.data.demo import make_demo
from msc_dist.data.shards import describe, iter_samples
from msc_dist.embed.config import EmbedConfig
from msc_dist.embed.job import main as embed_main
from msc_dist.index import load_index
from msc_dist.score.config import ScoreConfig
from msc_dist.score.job import main as score_main, read_scores
from msc_dist.scorer import Scorer
from msc_dist.scoring import roc_auc


def test_embeddings_by_id_and_index(embedded):
    res, out = embedded["result"], embedded["out"]
    keys = [s.key for sh in describe(embedded["data"]).shards for s in iter_samples(sh.url)]
    table = pq.read_table(os.path.join(out, "embeddings"))
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == res.rows == len(keys) == 96
    assert sorted(ids) == sorted(keys)
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert emb.shape == (96, 1280) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    ck = embedded["checkpoint"]
    model_id = hashlib.sha256(open(os.path.join(ck, "model.pt"), "rb").read()).hexdigest()
    assert set(table["model_id"].to_pylist()) == {model_id}
    idx = load_index(out, expected_model_id=model_id)
    n_cal = int(np.sum(table["calibration"].to_numpy()))
    assert idx.count == 96 - n_cal and idx.manifest.calibration_samples == n_cal > 0
    assert idx.manifest.threshold is not None and idx.manifest.extra["checkpoint"] == ck
    # Rows are stored by id: the index's vector for an id is that id's Parquet embedding.
    by_id = dict(zip(ids, emb))
    d, rows = idx.search(by_id[str(idx.ids[5])][None], 1)
    assert rows[0, 0] == 5 and d[0, 0] < 1e-5


def test_killed_embedding_job_leaves_no_manifest_and_rerun_completes(embedded, tmp_path):
    out = str(tmp_path / "emb")
    args = [sys.executable, "-m", "msc_dist.embed", "--checkpoint", embedded["run_dir"], "--out", out, "--batch-size", "4"]
    embed_main(EmbedConfig(checkpoint=embedded["run_dir"], out=out))  # a finished earlier run
    man = os.path.join(out, "index", "manifest.json")
    assert os.path.exists(man)
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while os.path.exists(man) and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)  # the rerun withdraws the old manifest first
    time.sleep(2.0)  # ... and is now embedding
    assert p.poll() is None, "the job ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    assert not os.path.exists(man)
    with pytest.raises(Exception, match="no manifest.json"):
        load_index(out)
    embed_main(EmbedConfig(checkpoint=embedded["run_dir"], out=out))
    assert load_index(out).count > 0


@pytest.fixture(scope="session")
def bucket(s3_server, tmp_path_factory):
    """~200 demo images (normal and defective), 2 truncated JPEGs and a non-image object in S3."""
    import boto3

    root = tmp_path_factory.mktemp("bucketsrc")
    make_demo(str(root), n_train=0, n_test_normal=100, n_test_defect=100, size=64, per_shard=200, seed=7)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="images")
    truth = {}
    for s in iter_samples(str(root / "test" / "shard-000000.tar")):
        key = f"lot1/{'a' if s.label == 0 else 'b'}/{s.key}.jpg"
        s3.put_object(Bucket="images", Key=key, Body=s.data)
        truth[f"s3://images/{key}"] = (s.label, s.data)
    good = next(iter(truth.values()))[1]
    s3.put_object(Bucket="images", Key="lot1/trunc1.jpg", Body=good[: len(good) // 2])
    s3.put_object(Bucket="images", Key="lot1/b/trunc2.jpg", Body=good[:100])
    s3.put_object(Bucket="images", Key="lot1/manifest.csv", Body=b"a,b\n1,2\n")
    return truth


def test_offline_scoring_of_an_s3_bucket(embedded, bucket, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="runs")
    # The index travels to S3 too, as users keep it there.
    fs = storage.filesystem("s3://runs")
    fs.put(os.path.join(embedded["out"], "index"), "runs/idx/index", recursive=True)
    cfg = ScoreConfig(index="s3://runs/idx", input="s3://images/lot1", out="s3://runs/scores", batch_size=32, rows_per_task=64)
    res = score_main(cfg)
    t = read_scores("s3://runs/scores").to_pylist()
    assert res.rows == len(t) == 203 and res.errors == 3
    errs = {r["uri"]: r["error"] for r in t if r["error"]}
    assert set(errs) == {"s3://images/lot1/trunc1.jpg", "s3://images/lot1/b/trunc2.jpg", "s3://images/lot1/manifest.csv"}
    assert "not an image object" in errs["s3://images/lot1/manifest.csv"]
    scored = {r["uri"]: r for r in t if not r["error"]}
    assert set(scored) == set(bucket)
    labels = np.array([bucket[u][0] != 0 for u in scored])
    scores = np.array([scored[u]["score"] for u in scored])
    auc = roc_auc(scores, labels)
    assert auc > 0.75, auc
    r0 = next(iter(scored.values()))
    assert len(r0["neighbors"]) == 2 and r0["neighbors"][0]["distance"] <= r0["neighbors"][1]["distance"]

    # The offline score of an image equals the Scorer's score of the same image.
    scorer = Scorer(embedded["checkpoint"], embedded["out"])
    assert scorer.model.trunk.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)  # placed on CPU too
    uris = list(scored)[:6]
    direct = scorer.score_bytes([bucket[u][1] for u in uris])
    for u, d in zip(uris, direct):
        assert d.score == pytest.approx(scored[u]["score"], abs=1e-5)
        assert [n["id"] for n in d.neighbors] == [n["id"] for n in scored[u]["neighbors"]]

    # Rerunning into the same output replaces it: one published run, same row count.
    score_main(cfg)
    assert read_scores("s3://runs/scores").num_rows == 203
    assert len([p for p in fs.ls("runs/scores") if p.rsplit("/", 1)[-1].startswith("run-")]) == 1
