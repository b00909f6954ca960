"""Anomaly maps everywhere an image is scored (issue 27): ``msc predict --json/--maps``, ``msc score``'s
map columns and ``--maps DIR``, and ``POST /v1/score?maps=1`` in both serving layouts, on one index
version with a patch bank (a tiny checkpoint, its bank in 3 shards, built in-process as the
embedding job lays it out)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serving/ folder at the repo root

from conftest import free_port, tiny_checkpoint, tiny_index  # noqa: E402
from msc_dist import maps  # noqa: E402
from msc_dist.cli import main  # noqa: E402


def bank_index(out, checkpoint: str, train: dict[str, bytes], cal: list[bytes], *, num_shards: int = 3,
               budget: int = 48, target_fpr: float = 0.5):
    """An index version of ``train`` with its patch bank, one bank shard per index shard, published
    into ``out`` with the manifest record the embedding job writes (score mode global)."""
    from msc_dist.card import index_record, load_card
    from msc_dist.index import publish, threshold_at_fpr, version_root, write_index
    from msc_dist.index.build import write_shard
    from msc_dist.patches import PatchSpec, anomaly_map, bank_rows, nearest, new_bank_index, patch_scores

    card = load_card(checkpoint)
    spec = PatchSpec.default(card.backbone, source="msc", budget=budget, sigma=2.0)
    ids = list(train)
    z, p = card.embed_arrays_with_patches([card.preprocess(b) for b in train.values()], spec)
    zc, pc = card.embed_arrays_with_patches([card.preprocess(b) for b in cal], spec)
    man = write_index(str(out), z, ids, card.model_id, num_shards=num_shards, calibration=zc, target_fpr=target_fpr,
                      extra=index_record(card.checkpoint, card.config))
    _, h, w, c = p.shape
    bounds = np.linspace(0, len(z), num_shards + 1).astype(int)
    entries, cal_d = [], []
    for i in range(num_shards):
        lo, hi = bounds[i], bounds[i + 1]
        rows = bank_rows(p[lo:hi], spec, ids[lo:hi])
        index = new_bank_index(c)
        index.add(np.ascontiguousarray(rows.reshape(-1, c)))
        entries.append(asdict(write_shard(version_root(str(out), man.version), i, index,
                                          [x for x in ids[lo:hi] for _ in range(rows.shape[1])], folder="bank")))
        cal_d.append(nearest(index, pc.reshape(len(pc), h * w, c)))
    ps = patch_scores(anomaly_map(np.minimum.reduce(cal_d).reshape(-1, h, w), card.preprocess.image_size, spec.sigma))
    tp = threshold_at_fpr(ps, target_fpr)
    man.patch = {**spec.to_dict(), "score_mode": "global", "map_threshold": tp,
                 "thresholds": {"global": man.threshold, "patch": tp, "combined": None}, "grid": [h, w],
                 "dimension": c, "count": sum(e["count"] for e in entries), "selection": "coreset", "shards": entries}
    publish(str(out), man)
    return man


@pytest.fixture(scope="module")
def banked(tmp_path_factory):
    from msc_dist.data.demo import make_demo
    from msc_dist.data.shards import iter_samples

    root = tmp_path_factory.mktemp("banked")
    make_demo(str(root / "demo"), n_train=18, n_test_normal=4, n_test_defect=6, size=64, per_shard=100, seed=5)
    train = {s.key: s.data for s in iter_samples(str(root / "demo" / "train" / "shard-000000.tar"))}
    test = [s.data for s in iter_samples(str(root / "demo" / "test" / "shard-000000.tar"))]
    keys = list(train)
    ck = tiny_checkpoint(root / "ck", image_size=64, resize_mode="squash", seed=3)
    man = bank_index(root / "index", ck, {k: train[k] for k in keys[:14]}, [train[k] for k in keys[14:]])
    plain = root / "plain"
    tiny_index(plain, ck, {k: train[k] for k in keys[:8]})
    files = root / "files"
    files.mkdir()
    for i, data in enumerate(test):
        (files / f"t{i:02d}.jpg").write_bytes(data)
    return {"root": root, "index": str(root / "index"), "plain": str(plain), "checkpoint": ck, "manifest": man,
            "files": sorted(str(p) for p in files.iterdir()), "images": test}


@pytest.fixture(scope="module")
def scorer(banked):
    from msc_dist.scorer import open_scorer

    return open_scorer(banked["index"], banked["checkpoint"])


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_predict_json_and_overlays(banked, scorer, tmp_path, capsys):
    thr = scorer.map_threshold
    assert thr and thr > 0
    over = tmp_path / "overlays"
    rc, out, err = _run(["predict", "--index", banked["index"], "--json", "--maps", str(over), *banked["files"],
                         str(tmp_path / "missing.jpg")], capsys)
    assert rc == 0, err
    rows = json.loads(out)
    assert len(rows) == len(banked["files"]) + 1
    bad = rows[-1]
    assert bad["error"] and bad["map"] is None and bad["boxes"] == [] and bad["map_file"] is None
    expected = scorer.score_bytes(banked["images"], maps=True)
    for row, exp, path in zip(rows, expected, banked["files"]):
        assert row["map"] == maps.encode_map(exp.map, thr)  # the encoding of the Scorer's own map
        g, back = maps.decode_map(row["map"])
        assert g.shape == (64, 64) and np.abs(back - exp.map).max() <= row["map"]["scale"] / 2 + 1e-6
        assert row["patch_score"] == pytest.approx(float(exp.map.max()))
        assert (row["area"], row["boxes"]) == maps.regions(exp.map, thr)
        ov = Image.open(over / row["map_file"])
        assert ov.size == (64, 64) and ov.mode == "RGB"
        assert row["map_file"] == maps.map_file_name(path)
    assert sorted(os.listdir(over)) == sorted(r["map_file"] for r in rows[:-1])
    assert any(r["boxes"] for r in rows) and any(not r["boxes"] for r in rows[:-1])  # some over, some not
    rc, out, _ = _run(["predict", "--index", banked["index"], *banked["files"][:2]], capsys)
    assert rc == 0 and "area" in out.splitlines()[0] and "regions" in out.splitlines()[0]


def test_predict_maps_on_a_version_without_a_bank_is_a_one_line_error(banked, tmp_path, capsys):
    rc, out, err = _run(["predict", "--index", banked["plain"], "--maps", str(tmp_path / "o"), banked["files"][0]], capsys)
    assert rc == 2 and "has no patch bank" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    rc, out, _ = _run(["predict", "--index", banked["plain"], "--json", banked["files"][0]], capsys)
    assert rc == 0 and "map" not in json.loads(out)[0] and "area" not in json.loads(out)[0]  # rows as before


def test_score_job_writes_map_columns_and_heatmaps_only_over_the_threshold(banked, scorer, local_ray, tmp_path):
    from msc_dist.score.config import ScoreConfig
    from msc_dist.score.job import main as score_main, read_scores

    inp = tmp_path / "in"
    inp.mkdir()
    for p in banked["files"]:
        (inp / os.path.basename(p)).write_bytes(open(p, "rb").read())
    (inp / "junk.jpg").write_bytes(b"not an image")
    heat = tmp_path / "heat"
    res = score_main(ScoreConfig(index=banked["index"], input=str(inp), out=str(tmp_path / "out"), batch_size=4,
                                 rows_per_task=4, maps=str(heat), max_error_fraction=0.5))
    t = read_scores(str(tmp_path / "out")).to_pylist()
    assert len(t) == len(banked["files"]) + 1
    by_name = {os.path.basename(r["uri"]): r for r in t}
    junk = by_name.pop("junk.jpg")
    assert junk["error"] and junk["patch_score"] is None and junk["boxes"] == [] and junk["map_file"] is None
    thr = scorer.map_threshold
    expected = dict(zip([os.path.basename(p) for p in banked["files"]], scorer.score_bytes(banked["images"], maps=True)))
    over = set()
    for name, r in by_name.items():
        m = expected[name].map
        area, boxes = maps.regions(m, thr)
        assert r["patch_score"] == pytest.approx(float(m.max()), abs=1e-5)
        assert r["area"] == pytest.approx(area) and r["boxes"] == boxes
        if area > 0:
            over.add(r["map_file"])
            assert r["map_file"] == maps.map_file_name(r["uri"])
            assert (heat / r["map_file"]).read_bytes() == maps.heatmap_png(m, thr)
        else:
            assert r["map_file"] is None
    assert over and len(over) < len(by_name)  # some images over the threshold, some not
    assert set(os.listdir(heat)) == over and res.maps == len(over)


def test_score_job_refuses_maps_without_a_bank_and_keeps_its_columns(banked, local_ray, tmp_path):
    from msc_dist.config import ConfigError
    from msc_dist.score.config import ScoreConfig
    from msc_dist.score.job import main as score_main, read_scores

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(banked["images"][0])
    with pytest.raises(ConfigError, match="has no patch bank"):
        score_main(ScoreConfig(index=banked["plain"], input=str(inp), out=str(tmp_path / "o1"), maps=str(tmp_path / "h")))
    score_main(ScoreConfig(index=banked["plain"], input=str(inp), out=str(tmp_path / "o2")))
    assert read_scores(str(tmp_path / "o2")).column_names == ["uri", "score", "is_anomaly", "neighbors", "error"]


# --- Serving ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def apps(banked, local_ray):
    """The banked version in both layouts (3 bank shards over 2 IndexShard groups), and a version
    without a bank."""
    from ray import serve

    from serving.app import build_app

    port = free_port()
    serve.shutdown()  # a Serve left by an earlier test file keeps its own port and ignores ours
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"api_key_env": "MSC_TEST_NO_SUCH_VAR", "allow_anonymous": True, "max_files": 16,
            "model_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "gateway_options": {"ray_actor_options": {"num_cpus": 0.25}}}
    serve.run(build_app({**base, "index": banked["index"]}), name="mapsone", route_prefix="/one")
    serve.run(build_app({**base, "index": banked["index"], "index_shards": 2,
                         "shard_options": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}),
              name="mapssharded", route_prefix="/sharded")
    serve.run(build_app({**base, "index": banked["plain"]}), name="mapsplain", route_prefix="/plain")
    yield f"http://127.0.0.1:{port}"
    for name in ("mapsone", "mapssharded", "mapsplain"):
        serve.delete(name)


def test_serving_maps_equal_predict_in_both_layouts(apps, banked, capsys):
    # predict scores the files in batches, serving one image a request and then four in one: the
    # same bytes either way (patches.nearest recomputes FAISS's BLAS distances exactly).
    rc, out, err = _run(["predict", "--index", banked["index"], "--json", *banked["files"]], capsys)
    assert rc == 0, err
    rows = json.loads(out)
    with httpx.Client(timeout=120) as c:
        for layout in ("one", "sharded"):
            info = c.get(f"{apps}/{layout}/v1/model").json()
            assert info["index_version"] == banked["manifest"].version and info["index_shards"] == 3
            got = []
            for data in banked["images"]:  # one image a request, one request at a time
                r = c.post(f"{apps}/{layout}/v1/score?maps=1", content=data, headers={"content-type": "image/jpeg"})
                assert r.status_code == 200, r.text
                got += r.json()
            assert len(got) == len(rows)
            for g, row in zip(got, rows):
                assert g["map"] == row["map"], layout  # the same PNG bytes, base64 for base64
                assert g["boxes"] == row["boxes"] and g["area"] == row["area"] and g["patch_score"] == row["patch_score"]
                assert g["score"] == pytest.approx(row["score"], abs=1e-5)
            r = c.post(f"{apps}/{layout}/v1/score", params={"maps": "1"},
                       files=[("f", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(banked["images"][:4])])
            assert r.status_code == 200, r.text
            for g, row in zip(r.json(), rows):  # several in one request: the same map, byte for byte
                assert g["map"] == row["map"], layout
            plain = c.post(f"{apps}/{layout}/v1/score", content=banked["images"][0],
                           headers={"content-type": "image/jpeg"}).json()[0]
            assert "map" not in plain and "boxes" not in plain  # no maps unless asked
        doc = c.get(f"{apps}/one/openapi.json").json()["paths"]["/v1/score"]["post"]["description"]
        assert "maps=1" in doc and "png-uint8" in doc


def test_maps_requests_that_cannot_be_answered_say_why(apps, banked):
    data = banked["images"][0]
    h = {"content-type": "image/jpeg"}
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{apps}/plain/v1/score?maps=1", content=data, headers=h)
        assert r.status_code == 409 and "has no patch bank" in r.json()["error"]["message"], r.text
        r = c.post(f"{apps}/one/v1/score?maps=yes", content=data, headers=h)
        assert r.status_code == 400 and "maps must be 0 or 1" in r.json()["error"]["message"], r.text
        assert c.post(f"{apps}/plain/v1/score?maps=0", content=data, headers=h).status_code == 200


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_with_patches_gives_the_banks_patch_features(banked, scorer, tmp_path, capsys, fmt):
    """``msc export --patches --index`` on a version with a bank: the graph's second output is the
    patch features of the bank's PatchSpec, as PyTorch computes them, so a deployment without this
    package gets the Scorer's anomaly maps from them (over the same bank, ``Scorer.maps_of``)."""
    import torch

    from msc_dist.graph import run_exported
    from msc_dist.patches import PatchSpec

    out = tmp_path / fmt
    rc, stdout, err = _run(["export", "--checkpoint", banked["checkpoint"], "--format", fmt, "--out", str(out),
                            "--index", banked["index"], "--patches"], capsys)
    assert rc == 0, err
    assert "export check: patches" in stdout
    spec = json.loads((out / "export.json").read_text())
    bank = PatchSpec.from_dict(banked["manifest"].patch)
    assert PatchSpec.from_dict(spec["patches"]["spec"]) == bank == scorer.patch_spec
    x = np.stack([scorer.decode(b) for b in banked["images"][:5]]).transpose(0, 3, 1, 2).copy()  # 5: not traced
    z, p = run_exported(str(out / ("model.onnx" if fmt == "onnx" else "model.xml")), x)
    z_ref, p_ref = scorer.card.embed_with_patches(torch.from_numpy(x), bank)
    assert list(p.shape[1:]) == spec["patches"]["shape"][1:] and p.shape == p_ref.shape
    assert float(np.abs(z - z_ref).max()) <= 1e-4
    assert float(np.abs(p - p_ref).max()) <= 1e-4 * max(1.0, float(np.abs(p_ref).max()))
    want = scorer.score_bytes(banked["images"][:5], maps=True)
    got = scorer.maps_of(p)
    for g, w in zip(got, want):
        assert float(np.abs(g - w.map).max()) <= 1e-3 * max(1.0, float(w.map.max()))


def test_export_patches_of_the_frozen_trunk_without_an_index(banked, tmp_path, capsys):
    """Without --index, --patches takes the backbone's default PatchSpec with the checkpoint's
    patch_source: frozen (recorded or not), a second forward of the ImageNet trunk in the graph."""
    import torch

    from msc_dist.card import load_card
    from msc_dist.graph import run_exported
    from msc_dist.patches import PatchSpec

    out = tmp_path / "ts"
    rc, stdout, err = _run(["export", "--checkpoint", banked["checkpoint"], "--format", "torchscript",
                            "--out", str(out), "--patches"], capsys)
    assert rc == 0, err
    spec = json.loads((out / "export.json").read_text())
    card = load_card(banked["checkpoint"])
    frozen = PatchSpec.default(card.backbone, source="frozen")
    assert PatchSpec.from_dict(spec["patches"]["spec"]) == frozen
    x = np.stack([card.preprocess(b) for b in banked["images"][:3]]).transpose(0, 3, 1, 2).copy()
    z, p = run_exported(str(out / "model.torchscript.pt"), x)
    _, p_frozen = card.embed_with_patches(torch.from_numpy(x), frozen)
    _, p_msc = card.embed_with_patches(torch.from_numpy(x), PatchSpec.default(card.backbone, source="msc"))
    assert float(np.abs(p - p_frozen).max()) <= 1e-4 * max(1.0, float(np.abs(p_frozen).max()))
    assert float(np.abs(p - p_msc).max()) > 1e-3  # the checkpoint's own trunk differs: it is not that one
    rc, _, err = _run(["export", "--checkpoint", banked["checkpoint"], "--out", str(tmp_path / "plain")], capsys)
    assert rc == 0 and json.loads((tmp_path / "plain" / "export.json").read_text())["patches"] is None
