"""Anomaly maps for people and for clients: regions, the wire encoding, heatmaps and overlays.

An anomaly map is float32 numpy ``(S, S)`` at the model card's input size (the preprocessed
S x S image), larger = more anomalous; a pixel counts as defective where its value is above the
index version's ``map_threshold`` (calibrated on the calibration hold-out, see msc_dist.patches).
Pure numpy + PIL: no torch, no Ray, so every output (serving, ``msc score``, ``msc predict``)
encodes a map with the same code and gets the same bytes.

The encoding (``encode_map``), one for serving (``POST /v1/score?maps=1``) and ``msc predict
--json``::

    {"encoding": "png-uint8", "width": W, "height": H, "scale": s, "threshold": t,
     "threshold_level": 128, "png": "<base64 of an 8-bit grayscale PNG, W x H>"}

Each grey level g of the PNG is ``clip(round(map / (2 t) * 255), 0, 255)``: level 128 is the
threshold t, 255 means 2 t or more, and ``g * s`` (``s = 2 t / 255``) gives the map back within
half a level (``decode_map``). A pixel is over the threshold where g >= 128."""

from __future__ import annotations

import base64
import io
import math

import numpy as np

ENCODING = "png-uint8"
THRESHOLD_LEVEL = 128  # the grey level of the threshold: round(0.5 * 255) = 128
MAX_BOXES = 32  # regions reported per image (the largest); the area counts every pixel


def _check_map(m) -> np.ndarray:
    a = np.asarray(m)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"an anomaly map is a non-empty 2-D array (S, S), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"an anomaly map holds real numbers, got dtype {a.dtype}")
    if np.isnan(a).any():
        raise ValueError("the anomaly map holds NaN values")
    return a


def _check_threshold(t) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"map_threshold must be a positive finite number, got {t!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"map_threshold must be a positive finite number, got {t!r}")
    return t


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) runs of True in one boolean row."""
    d = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def components(mask: np.ndarray) -> list[dict]:
    """8-connected components of a boolean (H, W) mask: [{"box": [x0, y0, x1, y1], "area": n}]
    (x1, y1 exclusive), largest first, then in raster order of their first pixel. Runs per row,
    joined to the overlapping (or diagonally touching) runs of the row above by union-find."""
    mask = np.asarray(mask, dtype=bool)
    parent: list[int] = []
    runs: list[tuple[int, int, int]] = []  # (y, x0, x1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above: list[tuple[int, int, int]] = []  # (x0, x1, run id) of the previous row
    for y in range(mask.shape[0]):
        here = []
        j = 0
        for x0, x1 in _runs(mask[y]):
            rid = len(runs)
            runs.append((y, x0, x1))
            parent.append(rid)
            while j < len(above) and above[j][1] < x0:  # ends before x0 - 1: cannot touch this or later runs
                j += 1
            k = j
            while k < len(above) and above[k][0] <= x1:  # starts at most at x1: touches (8-connected)
                a, b = find(above[k][2]), find(rid)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
            here.append((x0, x1, rid))
        above = here
    comps: dict[int, list[int]] = {}
    for rid, (y, x0, x1) in enumerate(runs):
        root = find(rid)
        c = comps.get(root)
        if c is None:
            comps[root] = [x0, y, x1, y + 1, x1 - x0]
        else:
            c[0], c[1], c[2], c[3] = min(c[0], x0), min(c[1], y), max(c[2], x1), max(c[3], y + 1)
            c[4] += x1 - x0
    order = sorted(comps.items(), key=lambda kv: (-kv[1][4], kv[0]))  # root = the first run: raster order
    return [{"box": c[:4], "area": int(c[4])} for _, c in order]


def regions(m, threshold: float, max_boxes: int = MAX_BOXES) -> tuple[float, list[list[int]]]:
    """(area_fraction, boxes) of the pixels of map ``m`` above ``threshold``: the share of the
    map's pixels over it, and the bounding boxes ``[x0, y0, x1, y1]`` (map pixels, x1 and y1
    exclusive) of its 8-connected regions, the ``max_boxes`` largest, largest first."""
    a = _check_map(m)
    t = _check_threshold(threshold)
    if max_boxes < 0:
        raise ValueError(f"max_boxes must be >= 0, got {max_boxes}")
    over = a > t
    n = int(over.sum())
    if n == 0:
        return 0.0, []
    return n / over.size, [c["box"] for c in components(over)[:max_boxes]]


def levels(m, map_threshold: float) -> np.ndarray:
    """The uint8 grid of a map: clip(round(map / (2 map_threshold) * 255), 0, 255); the
    threshold is level 128, +inf is 255."""
    a = _check_map(m).astype(np.float64)
    t = _check_threshold(map_threshold)
    return np.clip(np.rint(a / (2.0 * t) * 255.0), 0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array; fixed settings, so the bytes are a
    function of the pixels alone (no time or text chunks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def encode_map(m, map_threshold: float) -> dict:
    """The wire encoding of a map (module docstring): a base64 grayscale PNG of its uint8 grid
    with its width, height and scale. The same bytes in serving and ``msc predict --json``."""
    g = levels(m, map_threshold)
    t = float(map_threshold)
    return {"encoding": ENCODING, "width": int(g.shape[1]), "height": int(g.shape[0]), "scale": 2.0 * t / 255.0,
            "threshold": t, "threshold_level": THRESHOLD_LEVEL, "png": base64.b64encode(_png(g)).decode("ascii")}


def decode_map(enc: dict) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 grid (H, W), float32 map = grid * scale) of an ``encode_map`` dict; ValueError
    when it is not one."""
    from PIL import Image

    if not isinstance(enc, dict) or enc.get("encoding") != ENCODING:
        raise ValueError(f"not a map encoding: expected a dict with encoding {ENCODING!r}")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(enc["png"], validate=True)))
        img.load()
    except Exception as e:
        raise ValueError(f"the map's png does not decode: {e}") from None
    if img.mode != "L" or img.size != (enc["width"], enc["height"]):
        raise ValueError(f"the map's png is {img.mode} {img.size[0]}x{img.size[1]}, "
                         f"not L {enc['width']}x{enc['height']}")
    g = np.asarray(img, dtype=np.uint8)
    return g, (g.astype(np.float64) * float(enc["scale"])).astype(np.float32)


def _colormap() -> np.ndarray:
    """(256, 3) uint8: black -> purple -> red -> orange -> light yellow (inferno-like)."""
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)
    x = np.linspace(0, len(anchors) - 1, 256)
    return np.stack([np.interp(x, np.arange(len(anchors)), anchors[:, c]) for c in range(3)], 1).round().astype(np.uint8)


COLORS = _colormap()
BOX_COLOR = np.array([0, 255, 255], np.uint8)  # cyan outlines of the regions over the threshold


def heatmap(m, map_threshold: float) -> np.ndarray:
    """(H, W, 3) uint8 colour image of a map, coloured by its levels (the threshold is the
    middle of the colour scale, 2x the threshold and above the brightest)."""
    return COLORS[levels(m, map_threshold)]


def heatmap_png(m, map_threshold: float) -> bytes:
    """PNG bytes of ``heatmap``."""
    return _png(heatmap(m, map_threshold))


def overlay(image, m, map_threshold: float) -> np.ndarray:
    """(S, S, 3) uint8: the preprocessed image with the heatmap blended in (weight growing with
    the map's level, so that normal areas stay visible) and the boxes of the regions over the
    threshold outlined in cyan."""
    img = np.asarray(image)
    a = _check_map(m)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"the image is (S, S, 3) uint8, got {img.shape} {img.dtype}")
    if img.shape[:2] != a.shape:
        raise ValueError(f"the image is {img.shape[1]}x{img.shape[0]}, its map {a.shape[1]}x{a.shape[0]}: "
                         "both must be the card's input size")
    g = levels(a, map_threshold)
    w = (0.15 + 0.55 * (g.astype(np.float32) / 255.0))[..., None]
    out = np.rint(img.astype(np.float32) * (1 - w) + COLORS[g].astype(np.float32) * w).astype(np.uint8)
    _, boxes = regions(a, map_threshold)
    for x0, y0, x1, y1 in boxes:
        out[y0, x0:x1] = out[y1 - 1, x0:x1] = BOX_COLOR
        out[y0:y1, x0] = out[y0:y1, x1 - 1] = BOX_COLOR
    return out


def overlay_png(image, m, map_threshold: float) -> bytes:
    """PNG bytes of ``overlay``."""
    return _png(overlay(image, m, map_threshold))


def summary(m, map_threshold: float, encode: bool = False) -> dict:
    """What an output reports of one map: ``patch_score`` (its maximum), ``area`` (the share of
    pixels over the threshold), ``boxes``; and with ``encode`` the ``map`` encoding."""
    area, boxes = regions(m, map_threshold)
    out = {"patch_score": float(np.max(m)), "area": area, "boxes": boxes}
    if encode:
        out["map"] = encode_map(m, map_threshold)
    return out


def map_file_name(sample_id: str, suffix: str = ".png") -> str:
    """The file name of one image's map picture, by its id: the id's last 60 safe characters and a
    hash of the whole id (unique, the same on every run and every worker, never a path)."""
    import hashlib
    import re

    sid = str(sample_id)
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", sid)[-60:].strip("._") or "image"
    return f"{tail}-{hashlib.sha256(sid.encode()).hexdigest()[:12]}{suffix}"

