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
from msc_dist.scorer import open_scorer
from msc_dist.scoring import roc_auc


def _embeddings(out: str):
    """The published version's embedding rows (the manifest lists its parts)."""
    import pyarrow as pa

    idx = load_index(out)
    return pa.concat_tables([pq.read_table(os.path.join(idx.root, f["file"])) for f in idx.manifest.extra["embeddings"]])


def test_embeddings_by_id_and_index(embedded):
    res, out = embedded["result"], embedded["out"]
    keys = [s.key for sh in describe(embedded["data"]).shards for s in iter_samples(sh.url)]
    table = _embeddings(out)
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == res.rows == len(keys) == 96
    assert sorted(ids) == sorted(keys)
    # the rate it prints: its index pass alone, within the whole job's time; the runtime resolved
    assert res.runtime == "torch" and 0 < res.embed_seconds < res.seconds
    assert res.images_per_s == pytest.approx(96 / res.embed_seconds)
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
    # The checkpoint was trained with resize_mode squash (not the default): the job embedded every
    # image as the checkpoint's mode makes it, recorded the mode, and the Scorer decodes the same way.
    from msc_dist.card import load_card
    from msc_dist.data.decode import decode_image

    card = load_card(ck)
    assert card.config["resize_mode"] == "squash" and idx.manifest.extra["resize_mode"] == "squash"
    assert card.preprocess.resize_mode == "squash" and idx.manifest.extra["preprocess"] == card.preprocess.to_dict()
    samples = {s.key: s.data for sh in describe(embedded["data"]).shards for s in iter_samples(sh.url)}
    some = ids[:6]
    views = {m: card.embed_arrays(np.stack([decode_image(samples[k], 64, resize_mode=m) for k in some]))
             for m in ("squash", "center_crop")}
    got = np.stack([by_id[k] for k in some])
    assert np.abs(got - views["squash"]).max() < 1e-4 < np.abs(got - views["center_crop"]).max()
    scorer = open_scorer(out)
    assert scorer.resize_mode == "squash" and scorer.info()["resize_mode"] == "squash"
    assert np.array_equal(scorer.decode(samples[some[0]]), decode_image(samples[some[0]], 64, resize_mode="squash"))


@pytest.mark.slow
def test_killed_rebuild_leaves_the_previous_version_live(embedded, tmp_path, monkeypatch):
    out = str(tmp_path / "emb")
    first = embed_main(EmbedConfig(checkpoint=embedded["run_dir"], out=out))  # a finished earlier run
    man = os.path.join(out, "current.json")
    before = open(man).read()
    # The rebuild reads a set large enough (1,500 images, 4 a batch) that it is still embedding when
    # it is killed, however fast the machine: it is killed as soon as its first part is written.
    big = make_demo(str(tmp_path / "big"), n_train=1500, n_test_normal=0, n_test_defect=0, size=48, per_shard=500)[0]
    args = [sys.executable, "-m", "msc_dist.embed", "--checkpoint", embedded["run_dir"], "--out", out, "--batch-size", "4",
            "--rows-per-file", "8", "--data", big.spec]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    new_parts = []
    while time.time() < deadline and p.poll() is None and not new_parts:
        time.sleep(0.2)  # the rebuild is under way once its first Parquet part is written
        new_parts = [v for v in os.listdir(os.path.join(out, "versions")) if v != first.manifest.version
                     and os.path.isdir(os.path.join(out, "versions", v, "embeddings"))]
    assert p.poll() is None, "the job ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    assert new_parts and open(man).read() == before  # the half-built version was never published
    scorer = open_scorer(out, embedded["checkpoint"])  # ... and the previous one still loads and scores
    assert scorer.index.manifest.version == first.manifest.version and scorer.index.count == first.manifest.count
    # A leftover younger than LEFTOVER_AGE_S may be a publish still under way (two publishes may
    # race), so cleanup keeps it; one older than that is a killed run's, and goes.
    from msc_dist.index import versions as index_versions

    monkeypatch.setattr(index_versions, "LEFTOVER_AGE_S", 0.0)
    second = embed_main(EmbedConfig(checkpoint=embedded["run_dir"], out=out))
    assert load_index(out).manifest.version == second.manifest.version != first.manifest.version
    # The killed version's folder is gone; the replaced one stays until the next rebuild.
    assert sorted(os.listdir(os.path.join(out, "versions"))) == sorted([first.manifest.version, second.manifest.version])


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
    fs.put(embedded["out"] + "/", "runs/idx/", recursive=True)
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
    scorer = open_scorer(embedded["out"], embedded["checkpoint"])
    assert scorer.card.model.trunk.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)  # placed on CPU too
    uris = list(scored)[:6]
    direct = scorer.score_bytes([bucket[u][1] for u in uris])
    for u, d in zip(uris, direct):
        assert d.score == pytest.approx(scored[u]["score"], abs=1e-5)
        assert [n["id"] for n in d.neighbors] == [n["id"] for n in scored[u]["neighbors"]]

    # Rerunning into the same output replaces it: one published run, same row count.
    score_main(cfg)
    assert read_scores("s3://runs/scores").num_rows == 203
    assert len([p for p in fs.ls("runs/scores") if p.rsplit("/", 1)[-1].startswith("run-")]) == 1


def _actor_pids(class_part: str) -> list[int]:
    """Processes of live Ray actors whose class name contains ``class_part`` (Ray sets each
    worker's process title to ray::<ActorClass>...)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if cmd.startswith("ray::") and class_part in cmd:
            out.append(int(d))
    return out


def test_ids_exact_after_an_embedding_actor_is_killed_mid_job(embedded, tmp_path):
    """Blocks much smaller than a shard, parts of 8 rows, and an embedding actor SIGKILLed once
    the first parts are written: the published rows are still exactly the kept samples."""
    import threading

    out = str(tmp_path / "killed")
    cfg = EmbedConfig(checkpoint=embedded["run_dir"], out=out, batch_size=4, rows_per_task=3, rows_per_file=8,
                      calibration_fraction=0.2)
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(res=embed_main(cfg)), daemon=True)
    t.start()
    killed, deadline = [], time.time() + 120
    while not killed and time.time() < deadline and t.is_alive():
        vs = os.path.join(out, "versions")
        written = [f for v in (os.listdir(vs) if os.path.isdir(vs) else [])
                   for f in (os.listdir(os.path.join(vs, v, "embeddings")) if os.path.isdir(os.path.join(vs, v, "embeddings")) else [])]
        pids = _actor_pids("EmbedActor")
        if written and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.05)
    t.join(300)
    assert killed, "no embedding actor was found alive mid-job"
    keys = [s.key for sh in describe(embedded["data"]).shards for s in iter_samples(sh.url)]
    ids = _embeddings(out)["id"].to_pylist()
    assert sorted(ids) == sorted(keys) and box["res"].rows == len(keys)
    assert load_index(out).count + box["res"].manifest.calibration_samples == len(keys)


def _score_files(folder, datas: dict[str, bytes]) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, data in datas.items():
        p = os.path.join(folder, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return str(folder)


@pytest.mark.slow
def test_score_run_over_the_error_limit_publishes_nothing(embedded, tmp_path):
    from msc_dist.score.__main__ import cli

    imgs = [s.data for s in iter_samples(describe(embedded["data"]).shards[0].url)][:6]
    good = _score_files(tmp_path / "good", {f"d{i % 2}/im{i}.jpg": d for i, d in enumerate(imgs)})
    bad = _score_files(tmp_path / "bad", {**{f"im{i}.jpg": d for i, d in enumerate(imgs[:2])},
                                          **{f"junk{i}.jpg": b"not an image" for i in range(3)}})
    out = str(tmp_path / "scores")
    assert cli(["--index", embedded["out"], "--input", good, "--out", out]) == 0
    first = read_scores(out)
    assert first.num_rows == 6 and first["error"].null_count == 6
    assert cli(["--index", embedded["out"], "--input", bad, "--out", out, "--max-error-fraction", "0.5"]) == 3
    after = read_scores(out)  # 3 errors in 5 rows > 50 %: the first run stays published, whole
    assert after.equals(first)
    runs = [d for d in os.listdir(out) if d.startswith("run-")]
    assert len(runs) == 2  # nothing deleted; the failed run's rows are kept for inspection
    # Within the limit, the same input publishes, with one error row per bad object.
    assert cli(["--index", embedded["out"], "--input", bad, "--out", out, "--max-error-fraction", "0.7"]) == 0
    t = read_scores(out).to_pylist()
    assert len(t) == 5 and sum(1 for r in t if r["error"]) == 3


def test_tar_shards_without_shards_json_are_scored_as_shards(embedded, tmp_path):
    import shutil

    src = describe(embedded["data"]).shards
    folder = tmp_path / "foreign"
    folder.mkdir()
    for sh in src[:2]:
        shutil.copy(sh.url, folder / os.path.basename(sh.url))  # tar files, no shards.json
    n = sum(1 for sh in src[:2] for _ in iter_samples(sh.url))
    res = score_main(ScoreConfig(index=embedded["out"], input=str(folder), out=str(tmp_path / "s")))
    t = read_scores(str(tmp_path / "s")).to_pylist()
    assert res.rows == len(t) == n and res.errors == 0
    assert all("#" in r["uri"] and r["uri"].split("#")[0].endswith(".tar") for r in t)


def test_no_threshold_means_null_is_anomaly(embedded, tmp_path):
    import json
    import shutil

    idx = tmp_path / "idx"
    src = load_index(embedded["out"]).root
    shutil.copytree(src, idx)  # a pinned version folder: loaded as it is, no pointer
    man_path = idx / "manifest.json"
    man = json.loads(man_path.read_text())
    man["threshold"] = None
    man_path.write_text(json.dumps(man))
    imgs = [s.data for s in iter_samples(describe(embedded["data"]).shards[0].url)][:3]
    res = score_main(ScoreConfig(index=str(idx), input=_score_files(tmp_path / "in", {f"{i}.png": d for i, d in enumerate(imgs)}),
                                 out=str(tmp_path / "s")))
    t = read_scores(str(tmp_path / "s"))
    assert res.rows == 3 and t["is_anomaly"].null_count == 3 and t["score"].null_count == 0


def test_capped_reads_and_paged_listing_on_s3(s3_server):
    import boto3

    from msc_dist.data.rows import iter_listing

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="listing")
    keys = [f"a/{i:03d}.jpg" for i in range(7)] + [f"a/sub/{i}.png" for i in range(3)] + ["a/.hidden", "top.jpg"]
    for k in keys:
        s3.put_object(Bucket="listing", Key=k, Body=b"x" * 100)
    found = sorted(u for u, _ in iter_listing("s3://listing/a", recursive=True, page=3))  # 4 pages
    assert found == sorted(f"s3://listing/{k}" for k in keys if k.startswith("a/") and ".hidden" not in k)
    level = sorted(iter_listing("s3://listing/a", recursive=False, page=2))
    assert ("s3://listing/a/sub/", True) in level and len(level) == 8
    assert storage.read_capped("s3://listing/top.jpg", 100) == b"x" * 100
    with pytest.raises(storage.TooLarge):
        storage.read_capped("s3://listing/top.jpg", 99)


def test_a_plan_that_cannot_be_scheduled_fails_fast(embedded, tmp_path):
    from msc_dist.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be scheduled.*cpus-per-actor"):
        embed_main(EmbedConfig(checkpoint=embedded["run_dir"], out=str(tmp_path / "x"), cpus_per_actor=4))


def test_decode_on_device_gives_the_same_rows(embedded, tmp_path):
    """--decode-on-device on: read tasks pass header-checked bytes and the actors decode the batch
    on their device (the CPU here; nvjpeg on a GPU): same ids, the same features within the
    decoders' pixel tolerance."""
    out = str(tmp_path / "dev")
    res = embed_main(EmbedConfig(checkpoint=embedded["run_dir"], out=out, decode_on_device="on", batch_size=16,
                                 calibration_fraction=0.2, target_fpr=0.05))
    a, b = _embeddings(out), _embeddings(embedded["out"])
    za = dict(zip(a["id"].to_pylist(), np.stack(a["embedding"].to_numpy(zero_copy_only=False))))
    zb = dict(zip(b["id"].to_pylist(), np.stack(b["embedding"].to_numpy(zero_copy_only=False))))
    assert set(za) == set(zb) and res.rows == len(zb) and res.corrupt == 0
    cos = np.array([float(za[k] @ zb[k]) for k in za])
    assert cos.min() > 0.99, cos.min()
