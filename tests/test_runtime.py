"""The model card's CPU runtimes (msc_dist.runtime): ONNX Runtime and OpenVINO run the
checkpoint's own export and give PyTorch's embeddings and scores; the graph cache is built once
per (model id, image size, runtime), reused, rebuilt for another model, and a corrupted cached
graph is detected and rebuilt, never used. One tiny checkpoint, its graphs built once per session."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import torch

from conftest import noise_images, tiny_checkpoint, tiny_index
from msc_dist import runtime as rt
from msc_dist.card import load_card
from msc_dist.config import ConfigError
from msc_dist.export import check_images

CPU = [r for r in rt.CPU_RUNTIMES if rt.installed(r)]
pytestmark = pytest.mark.skipif(not CPU, reason="no CPU runtime installed (pip install '.[cpu]')")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny checkpoint, its torch card, and a card per installed CPU runtime (graphs built once)."""
    root = tmp_path_factory.mktemp("runtime")
    ck = tiny_checkpoint(root / "ck", image_size=32, resize_mode="squash")
    cache = str(root / "cache")
    cards = {r: load_card(ck, "cpu", r, cache=cache) for r in CPU}
    return {"ck": ck, "cache": cache, "torch": load_card(ck), "cards": cards, "root": root}


@pytest.mark.parametrize("n", [1, 5])  # batch sizes other than the exported one (2)
def test_each_runtime_embeds_as_torch(built, n):
    ref_card = built["torch"]
    x = check_images(n, ref_card.preprocess, seed=3)
    ref = ref_card.embed(torch.from_numpy(x))
    for r, card in built["cards"].items():
        assert card.runtime == r and card.graph.built and card.threads >= 1
        got = card.embed(torch.from_numpy(x))
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-4, r
        rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (B, S, S, 3), as the Ray Data rows hold them
        assert np.abs(card.embed_arrays(rows) - ref).max() <= 1e-4, r
        assert np.abs(card.embed_arrays(list(rows)) - ref).max() <= 1e-4, r
        assert card.info()["runtime"] == r


def test_each_runtimes_scores_equal_torchs(built):
    from msc_dist.scorer import open_scorer

    imgs = dict(zip([f"n{i}" for i in range(12)], noise_images(12, seed=1)))
    tiny_index(built["root"] / "index", built["ck"], imgs)
    queries = noise_images(6, seed=7)
    ref = [r.score for r in open_scorer(str(built["root"] / "index"), runtime="torch").score_bytes(queries)]
    for r, card in built["cards"].items():
        got = [s.score for s in open_scorer(str(built["root"] / "index"), card=card).score_bytes(queries)]
        assert np.abs(np.array(got) - np.array(ref)).max() <= 1e-4, r


def test_the_cache_is_reused_and_rebuilt_for_another_model(built, tmp_path):
    r = CPU[-1]
    again = load_card(built["ck"], "cpu", r, cache=built["cache"])
    assert not again.graph.built and again.graph.folder == built["cards"][r].graph.folder
    assert again.graph.folder.startswith(built["cache"]) and not again.graph.folder.startswith(built["ck"])
    other = tiny_checkpoint(tmp_path / "other", image_size=32, resize_mode="squash", seed=1)
    card = load_card(other, "cpu", r, cache=built["cache"])
    assert card.model_id != again.model_id and card.graph.built and card.graph.folder != again.graph.folder
    ref = load_card(other).embed_arrays([card.preprocess(b) for b in noise_images(3)])
    assert np.abs(card.embed_arrays([card.preprocess(b) for b in noise_images(3)]) - ref).max() <= 1e-4
    assert not any(n.startswith(".tmp-") for n in os.listdir(built["cache"]))  # nothing half-built left behind


def test_a_corrupted_cached_graph_is_rebuilt_never_used(built, caplog):
    r = CPU[0]
    folder = built["cards"][r].graph.folder
    name = rt._files_of(r)[-1]  # the weights (openvino: model.bin; onnxruntime: model.onnx)
    path = os.path.join(folder, name)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(rt.CorruptGraph):
        rt.read_verified(folder, built["torch"].model_id, 32, r)
    with caplog.at_level(logging.WARNING, logger="msc_dist.runtime"):
        card = load_card(built["ck"], "cpu", r, cache=built["cache"])
    assert card.graph.built and "corrupt" in caplog.text
    rec = json.loads(open(os.path.join(folder, rt.RECORD)).read())
    assert rt._sha256(open(path, "rb").read()) == rec["files"][name]  # the rebuilt graph is the verified one
    x = check_images(3, card.preprocess, seed=5)
    assert np.abs(card.embed(x) - built["torch"].embed(torch.from_numpy(x))).max() <= 1e-4


def test_auto_picks_a_cpu_runtime_on_cpu_and_torch_on_a_gpu(monkeypatch, caplog):
    assert rt.resolve("auto", "cpu") == CPU[0]  # the fastest installed (openvino, then onnxruntime)
    assert rt.resolve("auto", "cuda:0") == "torch"
    monkeypatch.setattr(rt, "installed", lambda r: False)
    with caplog.at_level(logging.WARNING, logger="msc_dist.runtime"):
        assert rt.resolve("auto", "cpu") == "torch"
    assert len(caplog.records) == 1 and "msc-dist[cpu]" in caplog.text


def test_a_missing_or_forbidden_runtime_is_a_clear_error(monkeypatch, built):
    with pytest.raises(ConfigError, match="--runtime torch"):
        rt.resolve("onnxruntime", "cuda")
    with pytest.raises(ConfigError, match=re.escape("valid: torch | onnxruntime | openvino | auto")):
        load_card(built["ck"], "cpu", "tensorrt")
    monkeypatch.setattr(rt, "installed", lambda r: False)
    with pytest.raises(ConfigError, match=r"openvino package is not installed.*msc-dist\[cpu\]"):
        load_card(built["ck"], "cpu", "openvino", cache=built["cache"])


def test_threads_follow_the_cpus(monkeypatch):
    assert rt.cpu_threads(3) == 3 and rt.actor_threads(0.5) == 1 and rt.actor_threads(4) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets for a one-CPU actor
    assert rt.cpu_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert rt.cpu_threads() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not rt.installed("openvino"), reason="openvino is not installed")
def test_msc_export_openvino_writes_ir_checked_in_openvino(built, tmp_path, capsys):
    import openvino as ov

    from msc_dist.cli import main

    out = tmp_path / "ov"
    (out).mkdir()
    (out / "model.onnx").write_bytes(b"stale")  # another format's file: one model per export folder
    assert main(["export", "--checkpoint", built["ck"], "--format", "openvino", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "openvino" in stdout and "max abs difference" in stdout
    spec = json.loads((out / "export.json").read_text())
    assert spec["format"] == "openvino" and spec["file"] == "model.xml" and spec["files"] == ["model.xml", "model.bin"]
    assert spec["check"]["max_abs_diff"] <= 1e-4 and spec["check"]["runtime"].startswith("openvino")
    assert sorted(p.name for p in out.iterdir()) == ["center.pt", "config.json", "export.json", "model.bin", "model.xml"]
    x = check_images(5, built["torch"].preprocess, seed=9)  # a batch size the export never saw
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.array(compiled(x)[0])
    assert np.abs(got - built["torch"].embed(torch.from_numpy(x))).max() <= 1e-4


def test_bench_embed_one_line_per_runtime(capsys):
    from msc_dist.cli import main

    assert main(["bench", "embed", "--backbone", "tiny_cnn", "--image-size", "32", "--images", "32", "--batch-size",
                 "16", "--loader-workers", "0", "--random-init", "--device", "cpu", "--runtime", "torch", CPU[-1]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["runtime"] for r in rows] == ["torch", CPU[-1]]
    assert all(r["images_per_s"] > 0 and r["model_images_per_s"] > 0 and r["images"] == 32 for r in rows)
    assert rows[0]["over_torch"] == 1.0


def test_embed_and_score_jobs_run_the_runtime_and_reuse_its_cached_graph(built, local_ray, tmp_path, monkeypatch):
    """Both Ray jobs with --runtime: the actors load the graph the fixture built (not rebuilt),
    and give the index and the scores that PyTorch gives."""
    import pyarrow.parquet as pq

    from msc_dist.data.shards import ShardWriter
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main as embed_main
    from msc_dist.index import version_root
    from msc_dist.score.config import ScoreConfig
    from msc_dist.score.job import main as score_main, read_scores
    from msc_dist.scorer import open_scorer

    r = CPU[-1]
    monkeypatch.setenv(rt.CACHE_ENV, built["cache"])
    folder = built["cards"][r].graph.folder
    before = (sorted(os.listdir(built["cache"])), open(os.path.join(folder, rt.RECORD)).read())
    normals = noise_images(16, seed=4)
    with ShardWriter(str(tmp_path / "data"), per_shard=8) as w:
        for i, b in enumerate(normals):
            w.write(f"n{i:03d}", b, "png", label=0)
    out = tmp_path / "idx"
    man = embed_main(EmbedConfig(checkpoint=built["ck"], data=str(tmp_path / "data"), out=str(out), batch_size=8,
                                 rows_per_task=8, rows_per_file=8, runtime=r)).manifest
    rows = {}
    for e in man.extra["embeddings"]:
        t = pq.read_table(os.path.join(version_root(str(out), man.version), e["file"]))
        rows.update(zip(t["id"].to_pylist(), t["embedding"].to_numpy(zero_copy_only=False)))
    keys = sorted(rows)
    ref_card = built["torch"]
    want = ref_card.embed_arrays([ref_card.preprocess(normals[int(k[1:])]) for k in keys])
    assert np.abs(np.stack([rows[k] for k in keys]) - want).max() <= 1e-4

    queries = tmp_path / "in"
    queries.mkdir()
    for i, b in enumerate(noise_images(4, seed=8)):
        (queries / f"q{i}.png").write_bytes(b)
    score_main(ScoreConfig(index=str(out), input=str(queries), out=str(tmp_path / "scores"), batch_size=4, runtime=r))
    t = read_scores(str(tmp_path / "scores")).to_pydict()
    got = {os.path.basename(u): s for u, s in zip(t["uri"], t["score"])}
    ref = open_scorer(str(out), runtime="torch").score_bytes([(queries / f"q{i}.png").read_bytes() for i in range(4)])
    assert [got[f"q{i}.png"] for i in range(4)] == pytest.approx([x.score for x in ref], abs=1e-4)
    assert (sorted(os.listdir(built["cache"])), open(os.path.join(folder, rt.RECORD)).read()) == before  # not rebuilt


def test_serving_runtime_setting(built, tmp_path, monkeypatch):
    """serving's runtime setting: checked at deploy time and before Serve starts, the Model's key,
    and the Model's card runs it (from the cache the fixture built)."""
    from msc_dist.index import read_manifest
    from serving.model import MODEL_KEYS, Model
    from serving.settings import AppConfig, check_startup

    with pytest.raises(ConfigError, match=re.escape("runtime: unknown runtime 'tensorrt'; valid: torch | onnxruntime")):
        AppConfig.from_args({"runtime": "tensorrt"})
    assert "runtime" in MODEL_KEYS
    with pytest.raises(ConfigError, match="--runtime torch"):
        check_startup(AppConfig.from_args({"allow_anonymous": True, "device": "cuda", "runtime": CPU[0]}))
    idx = tmp_path / "idx"
    tiny_index(idx, built["ck"], dict(zip(["a", "b", "c", "d", "e"], noise_images(5, seed=6))))
    monkeypatch.setenv(rt.CACHE_ENV, built["cache"])
    model = Model.func_or_class(index=str(idx), device="cpu", runtime=CPU[0], allow_anonymous=True)
    card = model._card(read_manifest(str(idx))[0])
    assert card.runtime == CPU[0] and not card.graph.built and card.info()["runtime"] == CPU[0]


@pytest.mark.parametrize("source", ["frozen", "msc"])
def test_each_runtime_gives_torchs_patch_features_and_maps_from_one_cached_graph(built, source):
    """Anomaly maps in a CPU runtime: one graph with a second output ``patches`` (the PatchSpec's),
    built and checked on first use, cached beside the plain graph and reused by the next card; its
    features, patches and maps equal PyTorch's within 1e-4."""
    from msc_dist.patches import PatchSpec, anomaly_map, bank_rows, nearest, new_bank_index

    ref_card = built["torch"]
    spec = PatchSpec.default(ref_card.backbone, source=source, budget=6)
    normal = check_images(6, ref_card.preprocess, seed=11)
    z_n, p_n = ref_card.embed_with_patches(torch.from_numpy(normal), spec)
    bank = new_bank_index(p_n.shape[-1])
    bank.add(np.ascontiguousarray(bank_rows(p_n, spec, [f"n{i}" for i in range(6)]).reshape(-1, p_n.shape[-1])))
    x = check_images(5, ref_card.preprocess, seed=12)
    z_ref, p_ref = ref_card.embed_with_patches(torch.from_numpy(x), spec)
    h, w = p_ref.shape[1:3]
    m_ref = anomaly_map(nearest(bank, p_ref.reshape(5, h * w, -1)).reshape(5, h, w), 32, spec.sigma)
    for r in CPU:
        card = load_card(built["ck"], "cpu", r, cache=built["cache"])
        z, p = card.embed_with_patches(torch.from_numpy(x), spec)
        loaded = card._patch_graphs[spec]
        assert loaded.folder != card.graph.folder and loaded.folder.startswith(built["cache"])
        assert p.shape == p_ref.shape and p.dtype == np.float32
        assert np.abs(z - z_ref).max() <= 1e-4 and np.abs(z - card.embed(torch.from_numpy(x))).max() <= 1e-6, r
        assert np.abs(p - p_ref).max() <= 1e-4 * max(1.0, np.abs(p_ref).max()), r
        m = anomaly_map(nearest(bank, p.reshape(5, h * w, -1)).reshape(5, h, w), 32, spec.sigma)
        assert np.abs(m - m_ref).max() <= 1e-4 * max(1.0, m_ref.max()), r
        rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        assert np.array_equal(card.embed_arrays_with_patches(rows, spec)[1], p), r  # same graph, same bits
        again = load_card(built["ck"], "cpu", r, cache=built["cache"])
        again.embed_with_patches(torch.from_numpy(x[:1]), spec)
        assert not again._patch_graphs[spec].built and again._patch_graphs[spec].folder == loaded.folder, r
