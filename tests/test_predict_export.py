"""msc predict, msc export and msc test on the shared trained checkpoint and its index (the
session fixtures): in this process, no Ray, the Scorer's own scores; exported models checked in
ONNX Runtime and TorchScript against PyTorch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from msc_dist.cli import main
from msc_dist.data.shards import describe, iter_samples


@pytest.fixture(scope="module")
def scorer(embedded):
    from msc_dist.checkpoint import resolve
    from msc_dist.scorer import open_scorer

    return open_scorer(embedded["out"], resolve(embedded["run_dir"]))


@pytest.fixture(scope="module")
def test_samples(embedded):
    test = os.path.join(embedded["root"], "demo", "test")
    return test, [s for sh in describe(test).shards for s in iter_samples(sh.url)]


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_predict_a_folder_scores_as_the_scorer_with_an_error_row_per_bad_file(embedded, scorer, test_samples,
                                                                             tmp_path, capsys):
    _, samples = test_samples
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    good = {}
    for i, s in enumerate(samples[:3]):
        good[str(d / f"img{i}.jpg")] = s.data
        (d / f"img{i}.jpg").write_bytes(s.data)
    png = d / "sub" / "z.png"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(png)
    good[str(png)] = png.read_bytes()
    (d / "notes.txt").write_text("not an image")
    (d / "cut.jpg").write_bytes(samples[3].data[:200])  # truncated JPEG
    (d / ".hidden.jpg").write_bytes(samples[4].data)  # skipped
    missing = str(tmp_path / "nope.jpg")

    rc, out, _ = _run(["predict", "--index", embedded["out"], "--json", str(d), missing], capsys)
    assert rc == 0
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [str(d / n) for n in ("cut.jpg", "img0.jpg", "img1.jpg", "img2.jpg",
                                                               "notes.txt", "sub/z.png")] + [missing]
    by = {r["path"]: r for r in rows}
    want = dict(zip(good, scorer.score_bytes(list(good.values()))))
    for p, r in want.items():
        assert by[p]["error"] is None and by[p]["score"] == pytest.approx(r.score, rel=1e-6, abs=1e-7)
        assert by[p]["is_anomaly"] == r.is_anomaly and by[p]["threshold"] == scorer.threshold
        assert [n["id"] for n in by[p]["neighbors"]] == [n["id"] for n in r.neighbors]
    assert "not a decodable image" in by[str(d / "notes.txt")]["error"]
    assert by[str(d / "cut.jpg")]["error"] and by[str(d / "cut.jpg")]["score"] is None
    assert "cannot read" in by[missing]["error"]

    rc, out, _ = _run(["predict", "--index", embedded["out"], str(d)], capsys)
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].split() == ["path", "score", "anomaly", "nearest", "error"]
    assert len(lines) == 1 + 6 + 1 and lines[-1].startswith("6 files:") and "2 errors" in lines[-1]
    assert f"{want[str(d / 'img0.jpg')].score:.4f}" in next(ln for ln in lines if "img0.jpg" in ln)


def _images(samples, size: int) -> np.ndarray:
    from msc_dist.data.decode import decode_image

    return np.stack([decode_image(s.data, size, resize_mode="squash") for s in samples]).transpose(0, 3, 1, 2).copy()


def test_export_onnx_runs_in_onnx_runtime_as_pytorch(embedded, scorer, test_samples, tmp_path, capsys):
    import onnxruntime as ort

    _, samples = test_samples
    out = tmp_path / "onnx"
    rc, stdout, err = _run(["export", "--checkpoint", embedded["run_dir"], "--format", "onnx", "--out", str(out),
                            "--index", embedded["out"]], capsys)
    assert rc == 0, err
    assert "max abs difference" in stdout
    spec = json.loads((out / "export.json").read_text())
    assert spec["check"]["max_abs_diff"] <= 1e-4 and spec["input"]["dtype"] == "uint8"
    man = json.loads((out / "index_manifest.json").read_text())
    assert spec["index"]["model_id"] == man["model_id"] == scorer.model_id == spec["model_id"]
    assert spec["index"]["threshold"] == scorer.threshold and spec["index"]["k"] == man["k"]
    assert torch.equal(torch.load(out / "center.pt", weights_only=True), scorer.card.center.cpu())
    assert json.loads((out / "config.json").read_text())["image_size"] == scorer.image_size

    x = _images(samples[:5], scorer.image_size)  # a batch size the export never saw
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["features"], {"images": x})[0]
    ref = scorer.embed(torch.from_numpy(x))
    assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-4
    # ... so the deployed model scores as the Scorer does
    s_onnx = [r.score for r in scorer.score_embeddings(got)]
    s_ref = [r.score for r in scorer.score_bytes([s.data for s in samples[:5]])]
    assert s_onnx == pytest.approx(s_ref, abs=1e-4)


def test_export_torchscript_with_float_input(embedded, scorer, test_samples, tmp_path, capsys):
    _, samples = test_samples
    out = tmp_path / "ts"
    rc, stdout, err = _run(["export", "--checkpoint", embedded["run_dir"], "--format", "torchscript",
                            "--input", "float", "--out", str(out)], capsys)
    assert rc == 0, err
    spec = json.loads((out / "export.json").read_text())
    assert spec["index"] is None and spec["input"]["dtype"] == "float32" and spec["file"] == "model.torchscript.pt"
    x = _images(samples[:3], scorer.image_size)
    m = torch.jit.load(str(out / "model.torchscript.pt"))
    got = m(torch.from_numpy(x).float() / 255.0).detach().numpy()
    assert float(np.abs(got - scorer.embed(torch.from_numpy(x))).max()) <= 1e-4


def test_msc_test_metrics_tables_and_plots_without_training(embedded, scorer, test_samples, tmp_path, capsys):
    from msc_dist.metrics import summary

    test, samples = test_samples
    out = tmp_path / "t"
    rc, stdout, err = _run(["test", "--index", embedded["out"], "--data", test, "--out", str(out),
                            "--gallery-k", "2"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["test_samples"] == len(samples) == 16 and res["anomalous"] == 8 and res["errors"] == []
    # the Scorer's scores, the evaluation's metrics
    scores = np.array([r.score for r in scorer.score_bytes([s.data for s in samples])])
    y = np.array([s.label != 0 for s in samples])
    want = summary(scores, y, scorer.threshold)
    for k in ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_95_tpr", "f1_max"):
        assert res["metrics"][k] == pytest.approx(want[k], abs=1e-9), k
    assert res["metrics"]["threshold"] == scorer.threshold and res["metrics"]["f1_max"] >= res["metrics"]["f1_at_threshold"]
    md = (out / "results.md").read_text()
    assert "| f1_max_threshold |" in md and "| threshold |" in md and md in stdout
    for name, size in {"roc.png": (640, 480), "pr.png": (640, 480), "hist-msc.png": (640, 480),
                       "gallery-msc.png": (480, 550)}.items():
        with Image.open(out / "plots" / name) as im:
            assert im.size == size, name
