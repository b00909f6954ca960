"""A tiny --all-classes evaluation on demo images through the real train/embed/score jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from msc_dist.data.demo import add_defect, encode_jpeg, texture
from msc_dist.evaluate.config import EvalConfig
from msc_dist.evaluate.job import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Demo textures as an image folder: class 'normal' and class 'spot' (defects)."""
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(3)
    for cls, n in (("normal", 24), ("spot", 12)):
        (root / cls).mkdir()
        for i in range(n):
            img = texture(rng, 48)
            if cls == "spot":
                img = add_defect(img, 2, rng)
            (root / cls / f"{cls}{i:03d}.jpg").write_bytes(encode_jpeg(img))
    return root


def _cfg(folder, out, **kw):
    return EvalConfig(data=str(folder), all_classes=True, out=str(out), image_size=32, epochs=1, batch_size=8, lr=1e-4,
                      num_workers=1, loader_workers=0, gallery_k=2, calibration_fraction=0.2, target_fpr=0.1, **kw)


@pytest.mark.slow
def test_all_classes_run_writes_table_json_and_plots_and_repeats(local_ray, folder, tmp_path):
    res = main(_cfg(folder, tmp_path / "a"))
    out = tmp_path / "a"
    assert set(res["classes"]) == {"normal", "spot"}
    for m in ("knn", "msc", "msc-noangular"):
        for c in ("normal", "spot"):
            r = res["classes"][c][m]
            assert 0 <= r["roc_auc"] <= 1 and 0 <= r["fpr_at_95_tpr"] <= 1 and r["test_samples"] > 0
        assert res["mean"][m]["roc_auc"] == pytest.approx(np.mean([res["classes"][c][m]["roc_auc"] for c in ("normal", "spot")]))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["mean"] == json.loads(json.dumps(res["mean"]))
    md = (out / "results.md").read_text()
    assert "| **mean** |" in md and "| normal class | knn | msc | msc-noangular |" in md
    # the F1-optimal threshold next to the calibrated one
    assert "## f1_max" in md and "## thresholds (calibrated / F1-optimal on the test set)" in md
    r = res["classes"]["spot"]["msc"]
    assert r["f1_max"] >= r["f1_at_threshold"] - 1e-12 and f"{r['threshold']:.4f} / {r['f1_max_threshold']:.4f}" in md
    assert (out / "class-normal" / "data" / "split.json").exists()

    expected = {f"roc-class-{c}.png": (640, 480) for c in ("normal", "spot")}
    expected |= {f"pr-class-{c}.png": (640, 480) for c in ("normal", "spot")}  # precision-recall beside the ROC
    expected |= {f"auc-per-epoch-class-{c}.png": (640, 480) for c in ("normal", "spot")}
    expected |= {f"hist-class-{c}-{m}.png": (640, 480) for c in ("normal", "spot") for m in ("knn", "msc", "msc-noangular")}
    # galleries: a row of the 2 highest, a row of the 2 lowest (no masks in this set)
    expected |= {f"gallery-class-{c}-{m}.png": (480, 550) for c in ("normal", "spot") for m in ("knn", "msc", "msc-noangular")}
    for name, size in expected.items():
        with Image.open(out / "plots" / name) as im:
            im.load()
            assert im.size == size, (name, im.size)
    # per-epoch AUC covers epoch 0 (frozen) and epoch 1
    assert [e for e, _ in res["classes"]["spot"]["epoch_auc"]["msc"]] == [0, 1]

    # Same seed: the same split and the same knn table (knn needs no training: quick to repeat).
    again = main(_cfg(folder, tmp_path / "b", methods=["knn"]))
    for c in ("normal", "spot"):
        assert (tmp_path / "b" / f"class-{c}" / "data" / "split.json").read_text() == \
               (out / f"class-{c}" / "data" / "split.json").read_text()
        assert again["classes"][c]["knn"] == res["classes"][c]["knn"]


def test_bad_method_and_class_are_clear_errors(folder, tmp_path):
    from msc_dist.config import ConfigError
    from msc_dist.data.shards import DataError

    with pytest.raises(ConfigError, match="valid: \\['knn', 'msc', 'msc-noangular'\\]"):
        main(EvalConfig(data=str(folder), normal_class="normal", methods=["svm"], out=str(tmp_path)))
    with pytest.raises(DataError, match="valid classes: \\['normal', 'spot'\\]"):
        main(EvalConfig(data=str(folder), normal_class="cat", out=str(tmp_path)))


def test_gallery_puts_each_mask_under_its_image(tmp_path):
    """Rows: highest images, their masks, lowest images, their masks; the mask panel shows the
    mask's own pixels (a white stripe on black) right under its image."""
    import io

    from msc_dist.evaluate import plots

    def png(a: np.ndarray) -> bytes:
        b = io.BytesIO()
        Image.fromarray(a).save(b, format="PNG")
        return b.getvalue()

    img = png(np.full((64, 64, 3), 128, np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 28:36] = 255
    hi = [(f"t{i} (anomalous)", 2.0 - i, True, img, png(mask)) for i in range(2)]
    lo = [(f"n{i} (normal)", 0.1, False, img, None) for i in range(2)]
    plots.gallery(str(tmp_path / "g.png"), hi, lo, "title")
    with Image.open(tmp_path / "g.png") as im:
        g = np.asarray(im.convert("L"))
    assert g.shape == (1050, 480)  # (2.5 x 4 rows + 0.5) x 100 dpi, 2.4 x 2 columns x 100 dpi
    # second panel row (the highest images' masks): white column in the middle of a black square
    band = g[int(0.5 * 100 + 2.5 * 100 + 60):int(0.5 * 100 + 2.5 * 200 - 20), :240]
    assert (band > 250).any() and (band < 5).any()
    # first panel row (the images themselves): uniform grey, no white stripe
    top = g[int(0.5 * 100 + 60):int(0.5 * 100 + 2.5 * 100 - 20), :240]
    assert not (top < 5).any()
