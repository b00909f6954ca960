"""Patch features, the patch bank and anomaly maps (issue 27): the embedding job on a real local
Ray builds the bank in shards, the Scorer loads it through ``open_scorer``, real demo images."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_checkpoint
from msc_dist.data.demo import encode_jpeg, make_demo, texture
from msc_dist.data.shards import describe, iter_samples
from msc_dist.embed.config import EmbedConfig
from msc_dist.embed.job import main as embed_main
from msc_dist.index import load_index
from msc_dist.patches import (PatchSpec, anomaly_map, bank_rows, nearest, new_bank_index, patch_scores,
                              select_patches)
from msc_dist.scorer import open_scorer

SIZE = 48


@pytest.fixture(scope="module")
def banked(local_ray, tmp_path_factory):
    """tiny_cnn at 48 px, 64 demo images; one version without a bank, one with a 3-shard bank."""
    root = tmp_path_factory.mktemp("patches")
    make_demo(str(root / "demo"), n_train=64, n_test_normal=6, n_test_defect=6, size=SIZE, per_shard=20)
    data = str(root / "demo" / "train")
    ck = tiny_checkpoint(root / "ck", image_size=SIZE, resize_mode="squash", data=data)
    common = dict(checkpoint=ck, num_shards=3, batch_size=16, rows_per_task=8, rows_per_file=16,
                  calibration_fraction=0.25, target_fpr=0.1)
    plain = embed_main(EmbedConfig(out=str(root / "plain"), **common))
    bank = embed_main(EmbedConfig(out=str(root / "bank"), score_mode="combined", patch_budget=24, **common))
    return {"root": root, "data": data, "test": str(root / "demo" / "test"), "ck": ck,
            "plain": str(root / "plain"), "bank": str(root / "bank"), "plain_res": plain, "bank_res": bank}


def _test_images(folder: str) -> list[bytes]:
    return [s.data for sh in describe(folder).shards for s in iter_samples(sh.url)]


def test_bank_built_in_shards_equals_one_bank_built_in_one_process(banked):
    idx = load_index(banked["bank"])
    man = idx.manifest
    spec = PatchSpec.from_dict(man.patch)
    assert len(man.patch["shards"]) == len(man.shards) == 3 and len(idx.bank) == 3
    # One bank in this process from the same normal images the job indexed (the calibration
    # hold-out left out), decoded and embedded by the same card.
    table = pa.concat_tables([pq.read_table(os.path.join(idx.root, f["file"]), columns=["id", "calibration"])
                              for f in man.extra["embeddings"]])
    indexed = {i for i, c in zip(table["id"].to_pylist(), table["calibration"].to_pylist()) if not c}
    assert len(indexed) == man.count > 0
    scorer = open_scorer(banked["bank"])
    card = scorer.card
    samples = [s for sh in describe(banked["data"]).shards for s in iter_samples(sh.url) if s.key in indexed]
    x = np.stack([card.preprocess(s.data) for s in samples])
    _, p = card.embed_arrays_with_patches(x, spec)
    rows = bank_rows(p, spec, [s.key for s in samples])
    one = new_bank_index(p.shape[-1])
    one.add(np.ascontiguousarray(rows.reshape(-1, p.shape[-1])))
    assert one.ntotal == man.patch["count"] == len(indexed) * spec.budget
    # Same nearest distances for the patches of unseen images (normal and defective).
    q = np.stack([card.preprocess(b) for b in _test_images(banked["test"])])
    _, qp = card.embed_arrays_with_patches(q, spec)
    b, h, w, c = qp.shape
    np.testing.assert_allclose(idx.search_patches(qp.reshape(b, h * w, c)), nearest(one, qp.reshape(b, h * w, c)),
                               rtol=1e-5, atol=1e-5)


def test_global_mode_gives_the_scores_without_a_bank_exactly(banked):
    """In score mode global, a version with a bank scores as before: asking for maps adds them
    and the patch score, and changes no score bit; the scores are those of the same model's
    version without a bank (same seed: same hold-out, same index rows)."""
    items = _test_images(banked["test"])
    plain = open_scorer(banked["plain"]).score_bytes(items)
    scorer = open_scorer(banked["bank"])
    scorer.score_mode = "global"  # the bank version scored as --score-mode global scores it
    scorer.searcher.manifest.threshold = scorer.manifest.patch["thresholds"]["global"]
    without, with_maps = scorer.score_bytes(items), scorer.score_bytes(items, maps=True)
    assert [r.score for r in with_maps] == [r.score for r in without]
    assert [r.neighbors for r in with_maps] == [r.neighbors for r in without]
    assert all(r.map is not None and r.patch_score == float(r.map.max()) for r in with_maps)
    assert all(r.map is None and r.patch_score is None for r in without)
    np.testing.assert_allclose([r.score for r in without], [r.score for r in plain], rtol=1e-6)
    assert [[n["id"] for n in r.neighbors] for r in without] == [[n["id"] for n in r.neighbors] for r in plain]
    assert scorer.threshold == pytest.approx(open_scorer(banked["plain"]).threshold, rel=1e-6)
    assert all("patch_score" not in r.to_dict() for r in plain)


def test_a_version_with_a_bank_scores_with_maps(banked):
    scorer = open_scorer(banked["bank"])
    assert scorer.score_mode == "combined" and scorer.map_threshold > 0
    t = scorer.manifest.patch["thresholds"]
    assert scorer.threshold == t["combined"]
    items = _test_images(banked["test"])
    res = scorer.score_bytes(items + [b"not an image"], maps=True)
    assert res[-1].error and res[-1].map is None
    glob = open_scorer(banked["plain"]).score_bytes(items)
    for r, g in zip(res[:-1], glob):
        assert r.map.shape == (SIZE, SIZE) and r.map.dtype == np.float32 and np.isfinite(r.map).all()
        assert r.patch_score == pytest.approx(float(r.map.max()), rel=1e-6)
        assert r.score == pytest.approx(g.score / t["global"] + r.patch_score / t["patch"], rel=1e-6)
        assert r.is_anomaly == (r.score > t["combined"])
        assert "map" not in r.to_dict() and r.to_dict()["patch_score"] == r.patch_score
    assert [r.map for r in scorer.score_bytes(items[:2])] == [None, None]  # maps only when asked
    # What serving awaits (Scorer.ascore_arrays) gives the same results as score_arrays.
    import asyncio

    x = np.stack([scorer.decode(b) for b in items])
    sync, served = scorer.score_arrays(x, maps=True), asyncio.run(scorer.ascore_arrays(x, maps=True))
    assert [r.to_dict() for r in served] == [r.to_dict() for r in sync]
    assert all(np.array_equal(a.map, b.map) for a, b in zip(served, sync))


def test_a_pasted_square_lights_up_the_map_where_it_is(banked):
    scorer = open_scorer(banked["bank"])
    rng = np.random.default_rng(7)
    img = texture(rng, SIZE)
    clean = scorer.score_bytes([encode_jpeg(img)], maps=True)[0].map
    img[28:40, 6:18] = (255, 0, 255)  # a 12 px magenta square at rows 28-40, columns 6-18
    m = scorer.score_bytes([encode_jpeg(img)], maps=True)[0].map
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert 24 <= y < 44 and 2 <= x < 22, (y, x)
    assert m[28:40, 6:18].mean() > 2 * clean[28:40, 6:18].mean()


def test_bank_rows_depend_on_the_image_alone():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 6, 6, 8)).astype(np.float32)
    spec = PatchSpec((1,), budget=10, seed=3)
    ids = [f"k{i}" for i in range(5)]
    whole = bank_rows(p, spec, ids)
    apart = np.concatenate([bank_rows(p[i:i + 2], spec, ids[i:i + 2]) for i in range(0, 5, 2)])
    assert whole.shape == (5, 10, 8) and np.array_equal(whole, apart)
    # The greedy coreset covers the image: its worst-covered patch is nearer than a random subset's.
    flat = p[0].reshape(36, 8)
    cover = lambda keep: np.sqrt(((flat[:, None] - flat[keep][None]) ** 2).sum(-1)).min(1).max()
    assert cover(select_patches(flat, 10, 0, "k0")) < cover(select_patches(flat, 10, 0, "k0", "random"))


def test_anomaly_map_is_at_the_image_size_and_peaks_where_the_distance_does():
    d = np.zeros((1, 4, 4), np.float32)
    d[0, 1, 2] = 9.0
    m = anomaly_map(d, 32, 2.0)
    assert m.shape == (1, 32, 32) and m.dtype == np.float32
    y, x = np.unravel_index(np.argmax(m[0]), (32, 32))
    assert 8 <= y < 16 and 16 <= x < 24
    assert patch_scores(m)[0] == m.max()


def test_the_single_serving_layout_scores_a_version_with_a_bank_by_its_score_mode(banked):
    """Served over real HTTP, a combined-mode version gives open_scorer's combined scores (not
    the global kNN with the combined threshold)."""
    import httpx
    from ray import serve

    from conftest import free_port
    from serving.app import build_app

    items = _test_images(banked["test"])[:4]
    want = open_scorer(banked["bank"]).score_bytes(items)
    port = free_port()
    serve.shutdown()  # a Serve left by an earlier test file keeps its own port and ignores ours
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"index": banked["bank"], "allow_anonymous": True,
                             "model_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                             "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}),
                  name="banked", route_prefix="/")
        with httpx.Client(timeout=60) as c:
            got = [c.post(f"http://127.0.0.1:{port}/v1/score", content=b, headers={"content-type": "image/jpeg"})
                   for b in items]
    finally:
        serve.shutdown()
    assert [r.status_code for r in got] == [200] * len(items)
    rows = [r.json()[0] for r in got]
    assert [r["score"] for r in rows] == pytest.approx([w.score for w in want], rel=1e-4)  # batch of 1 vs 4
    assert [r["patch_score"] for r in rows] == pytest.approx([w.patch_score for w in want], rel=1e-4)
    assert [r["is_anomaly"] for r in rows] == [w.is_anomaly for w in want]


@pytest.mark.parametrize("options, says", [
    ({"score_mode": "pach"}, "score_mode must be one of ['global', 'patch', 'combined']"),
    ({"score_mode": "patch", "patch_source": "imagenet"}, "patch_source must be one of ['frozen', 'msc']"),
    ({"score_mode": "patch", "patch_pool": 2}, "PatchSpec.pool must be an odd number"),
    ({"score_mode": "patch", "patch_norm": "l2"}, "PatchSpec.norm must be one of ['none', 'unit'], got 'l2'"),
    ({"patch_bank": True, "patch_budget": 0}, "patch_budget"),
    ({"score_mode": "combined", "calibration_fraction": 0.0}, "score_mode combined needs calibrated thresholds"),
])
def test_bad_patch_options_are_config_errors_before_ray_starts(tmp_path, monkeypatch, options, says):
    from msc_dist.config import ConfigError
    from msc_dist.embed import job

    make_demo(str(tmp_path / "demo"), n_train=4, n_test_normal=0, n_test_defect=0, size=32, per_shard=4)
    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="squash", data=str(tmp_path / "demo" / "train"))
    monkeypatch.setattr(job, "init_ray", lambda *a: pytest.fail("Ray started before the options were checked"))
    with pytest.raises(ConfigError, match=re.escape(says)):
        embed_main(EmbedConfig(checkpoint=ck, out=str(tmp_path / "o"), **options))
    assert not (tmp_path / "o").exists()


class _Stop(Exception):
    pass


def test_the_checkpoint_records_the_score_mode_and_the_embedding_job_takes_it(tmp_path, monkeypatch):
    """A run trained with score_mode / patch_source records them in its checkpoint; the embedding
    job builds that version unless its own flags say otherwise; older checkpoints mean global."""
    from msc_dist.config import ConfigError
    from msc_dist.embed import job
    from msc_dist.train.config import TrainConfig
    from msc_dist.train.job import validate

    with pytest.raises(ConfigError, match=re.escape("unknown score_mode 'pach'; valid: ['global', 'patch', 'combined']")):
        validate(TrainConfig(score_mode="pach"))
    with pytest.raises(ConfigError, match=re.escape("unknown patch_source 'imagenet'; valid: ['frozen', 'msc']")):
        validate(TrainConfig(patch_source="imagenet"))
    make_demo(str(tmp_path / "demo"), n_train=4, n_test_normal=0, n_test_defect=0, size=32, per_shard=4)
    data = str(tmp_path / "demo" / "train")
    seen = []
    real = job.patch_spec_of

    def spy(cfg, backbone):
        seen.append((cfg.score_mode, cfg.patch_source, real(cfg, backbone)))
        raise _Stop

    monkeypatch.setattr(job, "patch_spec_of", spy)
    ck = tiny_checkpoint(tmp_path / "ck", image_size=32, resize_mode="squash", data=data, score_mode="patch",
                         patch_source="msc")
    old = tiny_checkpoint(tmp_path / "old", image_size=32, resize_mode="squash", data=data)
    for c, flags in ((ck, {}), (ck, {"score_mode": "global"}), (ck, {"patch_source": "frozen"}), (old, {})):
        with pytest.raises(_Stop):
            embed_main(EmbedConfig(checkpoint=c, out=str(tmp_path / "o"), **flags))
    (m0, s0, p0), (m1, s1, p1), (m2, s2, p2), (m3, s3, p3) = seen
    assert (m0, s0, p0.source) == ("patch", "msc", "msc")
    assert (m1, s1, p1) == ("global", "msc", None)  # the flag wins: no bank
    assert (m2, s2, p2.source) == ("patch", "frozen", "frozen")
    assert (m3, s3, p3) == ("global", "frozen", None)


def test_an_unknown_patch_stage_names_the_backbone():
    from msc_dist.backbones import build_model
    from msc_dist.patches import PatchError, PatchExtractor

    with pytest.raises(PatchError, match=re.escape("tiny_cnn has no trunk stage(s) ['7']")):
        PatchExtractor(build_model("tiny_cnn"), PatchSpec((7,)))


def test_lite_patch_features_are_unit_length_per_stage_and_banks_recorded_before_stay_raw():
    """EfficientNet-Lite's default patch features: blocks 4 + 5, each stage's vector of length 1
    (measured: image ROC-AUC 0.957 against 0.915 for the raw blocks 3 + 4 on the tiles at 224 px).
    A bank whose manifest has no ``norm`` (written before) keeps its raw features."""
    import torch

    from msc_dist.backbones import build_model
    from msc_dist.patches import PatchExtractor

    spec = PatchSpec.default("efficientnet_lite0")
    assert (spec.stages, spec.norm) == ((4, 5), "unit")
    model = build_model("efficientnet_lite0").eval()
    x = torch.from_numpy(np.stack([texture(np.random.default_rng(i), 64) for i in range(2)])).permute(0, 3, 1, 2)
    x = x.float() / 255.0
    ext = PatchExtractor(model, spec)
    with torch.no_grad():
        z, p = ext(x)
    ext.close()
    assert p.shape == (2, 4, 4, 112 + 192)
    assert torch.linalg.norm(p[..., :112], dim=-1) == pytest.approx(torch.ones(2, 4, 4), abs=1e-5)
    assert torch.linalg.norm(p[..., 112:], dim=-1) == pytest.approx(torch.ones(2, 4, 4), abs=1e-5)
    old = PatchSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "norm"})
    assert old.norm == "none"
    ext = PatchExtractor(model, old)
    with torch.no_grad():
        _, raw = ext(x)
    ext.close()
    assert not np.allclose(torch.linalg.norm(raw[..., :112], dim=-1).numpy(), 1.0, atol=1e-2)
