"""msc_dist.maps: regions and boxes, the wire encoding, heatmaps and overlays (pure numpy + PIL)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msc_dist import maps


def _blob_map(size=64, boxes=((10, 20, 18, 26),), value=3.0, base=0.2):
    m = np.full((size, size), base, np.float32)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = value
    return m


def test_a_known_blob_gives_its_box_and_area():
    m = _blob_map(boxes=((10, 20, 18, 26),))
    area, boxes = maps.regions(m, 1.0)
    assert boxes == [[10, 20, 18, 26]]
    assert area == pytest.approx(8 * 6 / 64 ** 2)


def test_regions_are_8_connected_largest_first_and_capped():
    m = np.zeros((20, 20), np.float32)
    m[2:4, 2:4] = 1  # 4 px
    m[4, 4] = 1  # touches the first diagonally: one region 2..5
    m[10:15, 10:16] = 1  # 30 px: the largest
    m[0, 18] = 1  # 1 px, alone
    area, boxes = maps.regions(m, 0.5)
    assert boxes == [[10, 10, 16, 15], [2, 2, 5, 5], [18, 0, 19, 1]]
    assert area == pytest.approx(36 / 400)
    assert maps.regions(m, 0.5, max_boxes=1) == (area, [[10, 10, 16, 15]])
    # a U shape is one region (two runs in a row joined lower down)
    u = np.zeros((5, 5), bool)
    u[0:4, 0] = u[0:4, 4] = u[3, :] = True
    assert maps.components(u) == [{"box": [0, 0, 5, 4], "area": 11}]


def test_nothing_over_the_threshold_gives_no_boxes():
    assert maps.regions(_blob_map(value=0.9), 1.0) == (0.0, [])
    assert maps.regions(np.full((4, 4), 1.0), 1.0) == (0.0, [])  # strictly above


def test_encode_decode_round_trip_within_one_grey_level():
    rng = np.random.default_rng(0)
    thr = 0.37
    m = rng.uniform(0, 2 * thr, (48, 48)).astype(np.float32)
    enc = maps.encode_map(m, thr)
    assert (enc["encoding"], enc["width"], enc["height"]) == ("png-uint8", 48, 48)
    assert enc["scale"] == pytest.approx(2 * thr / 255)
    g, back = maps.decode_map(enc)
    assert g.dtype == np.uint8 and g.shape == (48, 48)
    assert np.abs(back - m).max() <= enc["scale"] * 0.5 + 1e-6  # half a level: within one
    png = Image.open(io.BytesIO(base64.b64decode(enc["png"])))
    assert png.format == "PNG" and png.mode == "L" and png.size == (48, 48)
    assert maps.encode_map(m.copy(), thr) == enc  # the bytes are a function of the map


def test_the_threshold_is_level_128_and_the_scale_saturates():
    thr = 0.8
    m = np.array([[0.0, thr, 2 * thr, 10 * thr], [np.inf, thr * 1.001, thr * 0.999, -1.0]], np.float32)
    g = maps.levels(m, thr)
    assert g.tolist() == [[0, 128, 255, 255], [255, 128, 127, 0]]
    g2, _ = maps.decode_map(maps.encode_map(m, thr))
    assert (g2 == g).all()
    # over the threshold (map > thr) <=> level >= 128 except within half a level of it
    rng = np.random.default_rng(1)
    r = rng.uniform(0, 2 * thr, (64, 64))
    far = np.abs(r - thr) > thr / 255
    assert ((maps.levels(r, thr) >= maps.THRESHOLD_LEVEL) == (r > thr))[far].all()


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 3, 3)), "2-D"), (np.zeros((0, 4)), "2-D"), (np.array([[np.nan]]), "NaN"),
    (np.array([["a"]]), "real numbers")])
def test_bad_maps_are_refused_with_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        maps.encode_map(bad, 1.0)


@pytest.mark.parametrize("thr", [0, -1, float("nan"), float("inf"), None, "x"])
def test_bad_thresholds_are_refused(thr):
    with pytest.raises(ValueError, match="map_threshold must be a positive finite number"):
        maps.regions(np.zeros((4, 4)), thr)


def test_decode_refuses_what_is_not_a_map():
    with pytest.raises(ValueError, match="not a map encoding"):
        maps.decode_map({"png": ""})
    enc = maps.encode_map(np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="does not decode"):
        maps.decode_map({**enc, "png": "bm90IGEgcG5n"})
    with pytest.raises(ValueError, match="not L 5x4"):
        maps.decode_map({**enc, "width": 5})


def test_heatmap_and_overlay_pngs():
    thr = 1.0
    m = _blob_map(size=32, boxes=((4, 6, 12, 10),))
    heat = Image.open(io.BytesIO(maps.heatmap_png(m, thr)))
    assert heat.mode == "RGB" and heat.size == (32, 32)
    h = np.asarray(heat)
    assert h[8, 8].sum() > h[0, 0].sum()  # the blob is brighter than the background
    img = np.full((32, 32, 3), 100, np.uint8)
    ov = np.asarray(Image.open(io.BytesIO(maps.overlay_png(img, m, thr))))
    assert ov.shape == (32, 32, 3)
    assert (ov[6, 4:12] == maps.BOX_COLOR).all() and (ov[9, 4:12] == maps.BOX_COLOR).all()  # the box outline
    assert (ov[6:10, 4] == maps.BOX_COLOR).all() and (ov[6:10, 11] == maps.BOX_COLOR).all()
    assert np.abs(ov[20, 20].astype(int) - 100).max() < 60  # normal areas keep the image visible
    with pytest.raises(ValueError, match="32x32, its map 16x16"):
        maps.overlay(img, np.zeros((16, 16)), thr)
    with pytest.raises(ValueError, match="uint8"):
        maps.overlay(img.astype(np.float32), m, thr)


def test_summary_reports_max_area_boxes_and_the_encoding():
    m = _blob_map(size=16, boxes=((2, 3, 5, 7),), value=2.5)
    s = maps.summary(m, 1.0, encode=True)
    assert s["patch_score"] == pytest.approx(2.5)
    assert s["boxes"] == [[2, 3, 5, 7]] and s["area"] == pytest.approx(12 / 256)
    assert s["map"] == maps.encode_map(m, 1.0)
    assert "map" not in maps.summary(m, 1.0)


def test_maps_imports_neither_torch_nor_ray():
    code = "import sys, msc_dist.maps; bad = [m for m in ('torch', 'ray') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("p", [0.1, 0.45, 0.6])
def test_components_equal_scipy_labelling_on_noise(p):
    ndimage = pytest.importorskip("scipy.ndimage")
    m = np.random.default_rng(int(p * 100)).random((96, 80)) < p
    lab, n = ndimage.label(m, structure=np.ones((3, 3)))
    areas = ndimage.sum(m, lab, range(1, n + 1))
    ref = sorted([s[1].start, s[0].start, s[1].stop, s[0].stop, int(a)]
                 for s, a in zip(ndimage.find_objects(lab), areas))
    assert sorted(c["box"] + [c["area"]] for c in maps.components(m)) == ref


def test_map_file_names_are_unique_safe_and_stable():
    a = maps.map_file_name("s3://b/x/shard-000001.tar#000017")
    assert a == maps.map_file_name("s3://b/x/shard-000001.tar#000017") and a.endswith(".png")
    assert "/" not in a and ":" not in a and "#" not in a and a.startswith("s3_b_x_shard-000001.tar_000017-")
    assert maps.map_file_name("a/b.jpg") != maps.map_file_name("a_b.jpg")  # same tail, other ids
    assert maps.map_file_name("../..").startswith("image-")
