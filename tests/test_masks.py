"""Masks in shards (``KEY.mask.png``, white = defect): packed by make-shards from the magnetic
tiles, counted by describe, read only by the readers that ask, skipped unread by the others, and
brought onto the model's S x S input with the image's own geometry; a bad mask is a counted skip."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dataset
from msc_dist.data.decode import Preprocess
from msc_dist.data.make_shards import make_shards
from msc_dist.data.masks import MaskSkip, MaskSkips, mask_array, sample_mask
from msc_dist.data.shards import MANIFEST, ShardWriter, describe, iter_samples

PRE = (0.5,) * 3


def _tiles(tmp_path, n_free=6, n_crack=3):
    """A few real magnetic tiles (image NAME.jpg with its mask NAME.png beside it), two classes."""
    src = shared_dataset("magnetic-tile")
    sub = tmp_path / "src"
    for cls, n in (("MT_Free", n_free), ("MT_Crack", n_crack)):
        (sub / cls / "Imgs").mkdir(parents=True)
        for j in sorted((src / cls / "Imgs").glob("*.jpg"))[:n]:
            shutil.copy(j, sub / cls / "Imgs" / j.name)
            shutil.copy(j.with_suffix(".png"), sub / cls / "Imgs" / j.with_suffix(".png").name)
    return sub


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_make_shards_packs_the_tiles_masks_and_readers_skip_them(tmp_path):
    """Default extensions (png included): each NAME.png beside NAME.jpg is that image's mask, not
    an image of its own; the shards carry it as KEY.mask.png, describe counts it (from shards.json
    and by scanning), and readers that do not ask for masks leave it unread."""
    sub = _tiles(tmp_path)
    res = make_shards(str(sub), str(tmp_path / "out"), normal_class="MT_Free", train_fraction=0.5, seed=0)
    assert res["train"].label_counts() == {1: 3}  # MT_Crack = 0, MT_Free = 1: one sample per image
    assert res["test"].label_counts() == {0: 3, 1: 3}
    assert res["train"].mask_count == 3 and res["test"].mask_count == 6
    man = json.loads((tmp_path / "out" / "test" / MANIFEST).read_text())
    assert sum(s["masks"] for s in man["shards"]) == 6
    os.remove(tmp_path / "out" / "test" / MANIFEST)  # the scan counts the same
    assert describe(str(tmp_path / "out" / "test")).mask_count == 6

    url = res["test"].shards[0].url
    plain = list(iter_samples(url))
    assert all(s.has_mask and s.mask is None and s.ext == "jpg" for s in plain)
    with_masks = list(iter_samples(url, masks=True))
    assert [s.key for s in with_masks] == [s.key for s in plain]
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    by_key = {os.path.splitext(r)[0].replace("/", "_"): r for r in split["test"]}
    for s in with_masks:  # the mask is the source PNG, byte for byte; MT_Free's are all black
        src_png = (sub / by_key[s.key]).with_suffix(".png").read_bytes()
        assert s.mask == src_png and s.data == (sub / by_key[s.key]).read_bytes()
        black = not np.asarray(Image.open(io.BytesIO(s.mask))).any()
        assert black == (s.label == 1)

    # the shard readers of the jobs decode every image and never see the masks
    from msc_dist.data.loader import LabelFilter, ShardStream, kept_counts, make_loader
    from msc_dist.data.rows import read_shards

    pre = Preprocess(32, "center_crop", PRE, PRE)
    batch = {"url": np.array([url], dtype=object), "keep": np.array(["null"], dtype=object)}
    blocks = list(read_shards(batch, pre, 10**8, 10**8, 100))
    assert sum(len(b["id"]) for b in blocks) == 6 and all(e == "" for b in blocks for e in b["error"])
    stream = ShardStream(kept_counts(describe(str(tmp_path / "out" / "test")), LabelFilter(None)), LabelFilter(None),
                         32, 6, resize_mode="center_crop")
    got = next(iter(make_loader(stream, 0)))
    assert got["images"].shape[0] == 6 and not any(got["corrupt"])

    # --no-masks: the same samples without masks
    bare = make_shards(str(sub), str(tmp_path / "bare"), normal_class="MT_Free", train_fraction=0.5, seed=0, masks=False)
    assert bare["test"].label_counts() == {0: 3, 1: 3} and bare["test"].mask_count == 0


def test_mask_lines_up_with_the_image_through_its_preprocess():
    """A bright square on an odd-sized image and the same square in its mask: after the image's
    own resize (and center crop), nearest-neighbour, the mask marks where the decoded image is
    bright, and it stays binary."""
    h, w = 150, 90
    img = np.zeros((h, w), np.uint8)
    img[60:100, 20:50] = 255
    mask = np.where(img > 0, 255, 0).astype(np.uint8)
    mask[70, 30] = 200  # grey above 127 is defect too
    for mode in ("center_crop", "squash"):
        pre = Preprocess(32, mode, PRE, PRE)
        m = mask_array(_png(mask), pre, (w, h))
        assert m.shape == (32, 32) and m.dtype == bool and m.any()
        x = pre(_png(img))[..., 0]
        sure = (x > 200) | (x < 50)  # away from the bilinear edge
        assert np.array_equal(m[sure], x[sure] > 200)
    # a long, thin image takes the crop-box path: the mask follows it
    thin = np.zeros((20, 400), np.uint8)
    thin[:, 190:210] = 255
    pre = Preprocess(16, "center_crop", PRE, PRE)
    m = mask_array(_png(thin), pre, (400, 20))
    x = pre(_png(thin))[..., 0]
    sure = (x > 200) | (x < 50)
    assert m.any() and np.array_equal(m[sure], x[sure] > 200)


def _sample(tmp_path, image: bytes | None, mask: bytes | None, label=1):
    folder = tmp_path / f"s{len(os.listdir(tmp_path))}"
    with ShardWriter(str(folder)) as w:
        if image is None:  # a mask member alone: no image for its key
            w.write("k", mask, "mask.png", label)
        else:
            w.write("k", image, "png", label, mask)
    return next(iter_samples(describe(str(folder)).shards[0].url, masks=True))


@pytest.fixture
def mask_log():
    """The lines our loggers (msc_dist.*) log during the test, caught by a handler on the
    ``msc_dist`` logger itself: pytest's caplog, on the root logger, saw none of them in the full
    suite (only there) although they are logged; see conftest's logger repairs."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    ours = logging.getLogger("msc_dist")
    h, level, disabled = Keep(logging.DEBUG), ours.level, ours.disabled
    ours.addHandler(h)
    ours.disabled = False
    ours.setLevel(logging.INFO)  # (also clears the loggers' isEnabledFor caches)
    yield lines
    ours.removeHandler(h)
    ours.disabled = disabled
    ours.setLevel(level)


def test_bad_masks_are_counted_skips(tmp_path, mask_log):
    pre = Preprocess(16, "squash", PRE, PRE)
    img = _png(np.zeros((20, 30), np.uint8))
    good = _sample(tmp_path, img, _png(np.full((20, 30), 255, np.uint8)))
    assert sample_mask(good, pre, True).all()
    normal_without = _sample(tmp_path, img, None, label=0)
    assert not sample_mask(normal_without, pre, False).any()  # a normal image without a mask: all normal
    skips = MaskSkips()
    cases = {"wrong_size": _sample(tmp_path, img, _png(np.zeros((30, 20), np.uint8))),
             "undecodable": _sample(tmp_path, img, b"\x89PNG\r\n\x1a\n not really"),
             "orphan": _sample(tmp_path, None, _png(np.zeros((20, 30), np.uint8))),
             "missing": _sample(tmp_path, img, None)}
    assert cases["orphan"].data is None and cases["orphan"].has_mask
    for kind, smp in cases.items():
        with pytest.raises(MaskSkip) as e:
            sample_mask(smp, pre, True)
        assert e.value.kind == kind, (kind, str(e.value))
        skips.add(smp.key, e.value)
    assert skips.counts == {"orphan": 1, "undecodable": 1, "wrong_size": 1, "missing": 1} and skips.total == 4
    assert sum("mask of k skipped" in m for m in mask_log) == 4


# ---- msc test with masks: a real version with a patch bank (the embedding job on a local Ray) --

@pytest.fixture(scope="module")
def tile_version(local_ray, tmp_path_factory):
    """Real tiles in shards (masks packed), a 32 px tiny_cnn checkpoint, and its version with a
    2-shard patch bank (score mode patch) built by the embedding job."""
    from conftest import tiny_checkpoint
    from msc_dist.embed.config import EmbedConfig
    from msc_dist.embed.job import main as embed_main

    root = tmp_path_factory.mktemp("tiles")
    src = shared_dataset("magnetic-tile")
    sub = root / "src"
    for cls, n in (("MT_Free", 14), ("MT_Crack", 3), ("MT_Blowhole", 3)):
        (sub / cls / "Imgs").mkdir(parents=True)
        for j in sorted((src / cls / "Imgs").glob("*.jpg"))[:n]:
            shutil.copy(j, sub / cls / "Imgs" / j.name)
            shutil.copy(j.with_suffix(".png"), sub / cls / "Imgs" / j.with_suffix(".png").name)
    make_shards(str(sub), str(root / "shards"), normal_class="MT_Free", train_fraction=0.7, seed=0)
    ck = tiny_checkpoint(root / "ck", image_size=32, resize_mode="squash", data=str(root / "shards" / "train"))
    embed_main(EmbedConfig(checkpoint=ck, out=str(root / "bank"), num_shards=2, batch_size=8, rows_per_task=8,
                           calibration_fraction=0.3, target_fpr=0.2, score_mode="patch", patch_budget=8,
                           normal_classes=["MT_Free"]))
    return {"root": root, "ck": ck, "bank": str(root / "bank"), "test": str(root / "shards" / "test")}


def _with_bad_masks(test: str, out: str) -> dict:
    """The test shards again, plus three samples whose masks cannot be used: one of another size,
    one that does not decode, one without an image (orphan). Returns their keys by kind."""
    samples = [s for sh in describe(test).shards for s in iter_samples(sh.url, masks=True)]
    crack = next(s for s in samples if np.asarray(Image.open(io.BytesIO(s.mask))).any())
    w, h = Image.open(io.BytesIO(crack.data)).size
    bad = {"wrong_size": "bad_size", "undecodable": "bad_png", "orphan": "bad_orphan"}
    with ShardWriter(out, classes=describe(test).classes) as wr:
        for s in samples:
            wr.write(s.key, s.data, s.ext, s.label, s.mask)
        wr.write(bad["wrong_size"], crack.data, crack.ext, crack.label, _png(np.zeros((h + 3, w), np.uint8)))
        wr.write(bad["undecodable"], crack.data, crack.ext, crack.label, crack.mask[: len(crack.mask) // 2])
        wr.write(bad["orphan"], crack.mask, "mask.png", crack.label)  # a mask member alone
    return bad


def test_msc_test_writes_pixel_metrics_and_counts_bad_masks(tile_version, tmp_path, capsys, mask_log):
    """msc test on tiles with masks and a version with a patch bank: results.json keeps roc_auc
    and adds image_roc_auc, pixel_roc_auc and pro, equal to the metrics of the Scorer's own maps
    against the masks brought onto the 32 px input; each bad mask is a counted, logged skip (its
    image still counts for the image metrics, the orphan is an error row); the gallery shows each
    image, its overlay and its mask."""
    from msc_dist.cli import main
    from msc_dist.metrics import pixel_roc_auc, pro, summary
    from msc_dist.scorer import open_scorer
    from msc_dist.scoring import roc_auc

    data = str(tmp_path / "test")
    bad = _with_bad_masks(tile_version["test"], data)
    out = tmp_path / "t"
    rc = main(["test", "--index", tile_version["bank"], "--data", data, "--out", str(out), "--gallery-k", "2",
               "--normal-classes", "MT_Free", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["mask_skips"] == {"orphan": 1, "undecodable": 1, "wrong_size": 1, "missing": 0}
    assert [e["key"] for e in res["errors"]] == [bad["orphan"]]
    logged = mask_log
    for kind, key in bad.items():
        assert sum(m.startswith(f"mask of {key} skipped ({kind})") for m in logged) == 1, logged
    assert "3 mask(s) skipped: 1 orphan, 1 undecodable, 1 wrong_size" in logged

    scorer = open_scorer(tile_version["bank"], device="cpu")
    assert scorer.score_mode == "patch"
    samples = [s for sh in describe(data).shards for s in iter_samples(sh.url, masks=True) if s.data is not None]
    got = scorer.score_bytes([s.data for s in samples], maps=True)
    y = np.array([s.label != 2 for s in samples])  # classes sorted: MT_Blowhole, MT_Crack, MT_Free
    assert res["test_samples"] == len(samples) == 4 + 6 + 2 and res["pixel_samples"] == len(samples) - 2
    good = [(r.map, mask_array(s.mask, scorer.preprocess, Image.open(io.BytesIO(s.data)).size))
            for s, r in zip(samples, got) if s.key not in bad.values()]
    assert any(m.any() for _, m in good) and all(m.shape == (32, 32) for _, m in good)
    m = res["metrics"]
    want = summary(np.array([r.score for r in got]), y, scorer.threshold)
    assert m["roc_auc"] == pytest.approx(want["roc_auc"], abs=1e-12)
    assert m["image_roc_auc"] == pytest.approx(roc_auc(np.array([r.patch_score for r in got]), y), abs=1e-12)
    assert m["pixel_roc_auc"] == pytest.approx(pixel_roc_auc(*zip(*good)), abs=1e-12)
    assert m["pro"] == pytest.approx(pro(*zip(*good)), abs=1e-12)
    assert 0 <= m["pro"] <= 1 and 0 <= m["pixel_roc_auc"] <= 1
    md = (out / "results.md").read_text()
    assert "| pixel_roc_auc |" in md and "| pro |" in md and "1 orphan, 1 undecodable, 1 wrong_size" in md
    with Image.open(out / "plots" / "gallery-msc.png") as im:  # 2 x (image, overlay, mask) rows of 2
        assert im.size == (480, 1550)


def test_msc_test_without_a_bank_or_without_masks_has_no_pixel_metrics(tile_version, tmp_path):
    """The same tiles on a version without a bank (same checkpoint, in-process), and a version
    with a bank on shards without masks: image metrics only, as before."""
    from conftest import tiny_index
    from msc_dist.evaluate.config import TestConfig
    from msc_dist.evaluate.tester import main as test_main

    train = [s for sh in describe(str(tile_version["root"] / "shards" / "train")).shards for s in iter_samples(sh.url)]
    tiny_index(tmp_path / "plain", tile_version["ck"], {s.key: s.data for s in train})
    bare = tmp_path / "bare"
    make_shards(str(tile_version["root"] / "src"), str(bare), normal_class="MT_Free", seed=0, masks=False)
    for index, data in ((str(tmp_path / "plain"), tile_version["test"]), (tile_version["bank"], str(bare / "test"))):
        res = test_main(TestConfig(index=index, data=data, out=str(tmp_path / "t"), gallery_k=1, device="cpu",
                                   normal_classes=["MT_Free"]))
        assert "roc_auc" in res["metrics"] and not {"image_roc_auc", "pixel_roc_auc", "pro"} & set(res["metrics"])
        assert "mask_skips" not in res


def test_bench_quality_patch_method_finds_the_defects_in_their_masks(tmp_path):
    """bench quality's patch method (frozen trunk) on an image folder whose defects (a bright
    square at a random place on grey noise) have masks beside them: the maps light up inside the
    masks (pixel ROC-AUC and PRO high), the bank holds the budget per banked image, no mask skipped."""
    from msc_dist.bench.quality import bench_quality
    from msc_dist.train.config import TrainConfig

    rng = np.random.default_rng(0)
    for cls, n in (("good", 20), ("bad", 8)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(60, 120, (48, 64), dtype=np.uint8)
            mask = np.zeros_like(a)
            if cls == "bad":
                y, x = rng.integers(4, 30), rng.integers(12, 40)
                a[y:y + 12, x:x + 12] = 255
                mask[y:y + 12, x:x + 12] = 255
            Image.fromarray(a).save(tmp_path / "src" / cls / f"{i}.jpg", quality=95)
            Image.fromarray(mask).save(tmp_path / "src" / cls / f"{i}.png")
    base = TrainConfig(backbone="tiny_cnn", image_size=32, batch_size=8, epochs=0, loader_workers=0, eval_every=0)
    res = bench_quality(str(tmp_path / "src"), ["good"], base, ["knn", "patch"], "cpu", log=lambda m: None,
                        patch={"budget": 5})
    r = res["classes"]["good"]["patch"]["seeds"][0]
    assert r["test_samples"] == 8 + 6 and r["pixel_samples"] == 14 and sum(r["mask_skips"].values()) == 0
    assert r["index_size"] % 5 == 0 and 0 < r["index_size"] <= 5 * 14
    assert r["roc_auc"] > 0.9 and r["pixel_roc_auc"] > 0.9 and r["pro"] > 0.5, r
    assert "pixel_roc_auc" not in res["classes"]["good"]["knn"] and res["mean"]["patch"]["pro"] == r["pro"]
    # combined: the same forward's global kNN and map maximum, each over its threshold
    assert r["combined_roc_auc"] > 0.9 and res["mean"]["patch"]["combined_roc_auc"] == r["combined_roc_auc"]
    assert "combined_roc_auc" not in res["classes"]["good"]["knn"]


def test_bench_quality_msc_patch_takes_the_named_patch_model(tmp_path):
    """msc-patch trains the --patch-model's method (here msc-fast: its preset's 6 epochs) once and
    takes that model's patches; an unknown patch model names the valid ones."""
    from msc_dist.bench.quality import bench_quality
    from msc_dist.train.config import TrainConfig

    rng = np.random.default_rng(1)
    for cls, n in (("good", 12), ("bad", 4)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(60, 120, (32, 32), dtype=np.uint8)
            if cls == "bad":
                a[8:20, 8:20] = 255
            Image.fromarray(a).save(tmp_path / "src" / cls / f"{i}.jpg", quality=95)
    base = TrainConfig(backbone="tiny_cnn", image_size=32, batch_size=4, epochs=1, loader_workers=0, eval_every=0)
    logs: list[str] = []
    res = bench_quality(str(tmp_path / "src"), ["good"], base, ["msc-patch"], "cpu", log=logs.append,
                        patch={"budget": 4}, patch_model="msc-fast")
    assert res["patch_model"] == "msc-fast" and set(res["classes"]["good"]) == {"msc-patch"}
    trained = [m for m in logs if m.startswith("class good msc-fast: epoch") and " epoch 0 " not in m]
    # epoch 0: the center; the preset's epochs unless its collapse alarm stopped the run
    assert 1 <= len(trained) <= TrainConfig.PRESETS["fast"]["epochs"], logs
    assert len(trained) == TrainConfig.PRESETS["fast"]["epochs"] or "stopped (on_collapse stop)" in trained[-1], logs
    assert not [m for m in logs if m.startswith("class good msc: ")]
    with pytest.raises(ValueError, match="valid: \\['msc', 'msc-fast', 'msc-natural', 'msc-noangular'\\]"):
        bench_quality(str(tmp_path / "src"), ["good"], base, ["msc-patch"], "cpu", log=logs.append,
                      patch_model="msc-big")
