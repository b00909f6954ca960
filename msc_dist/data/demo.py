"""The embedded demo data set: procedural surface textures, normal and with synthetic defects.

Normal: brushed-metal-like stripes over low-frequency noise, each image with its own phase,
slight rotation, contrast and lighting. Defects drawn on top: a scratch (thin straight line),
spots (dark blobs), a crack (jagged dark polyline). Labels: 0 normal, 1 scratch, 2 spot, 3 crack."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from msc_dist.data.shards import DatasetInfo, ShardWriter, describe

CLASSES = ["normal", "scratch", "spot", "crack"]


def _noise(rng: np.random.Generator, size: int, cutoff: float) -> np.ndarray:
    f = np.fft.fftfreq(size)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    spec = np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-((r / cutoff) ** 2))
    n = np.real(np.fft.ifft2(spec))
    return (n - n.mean()) / (n.std() + 1e-8)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = math.radians(20 + rng.normal(0, 4))
    freq = 18 + rng.normal(0, 1.5)
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 2 * math.pi))
    grain = _noise(rng, size, 0.25)
    low = _noise(rng, size, 0.03)
    v = 0.55 + 0.08 * stripes + 0.05 * grain + 0.06 * low + rng.normal(0, 0.03)
    v = np.clip(v * rng.uniform(0.9, 1.1), 0, 1)
    tint = np.array([1.0, 0.97, 0.92]) * rng.uniform(0.95, 1.05, size=3)
    return (np.clip(v[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def add_defect(img: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    s = img.shape[0]
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    if kind == 1:  # scratch: one bright or dark thin line across part of the tile
        x0, y0 = rng.uniform(0.1, 0.9, 2) * s
        ang, ln = rng.uniform(0, math.pi), rng.uniform(0.3, 0.7) * s
        x1, y1 = x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)
        col = (235, 235, 235) if rng.random() < 0.5 else (40, 40, 40)
        d.line([(x0, y0), (x1, y1)], fill=col, width=max(1, s // 64))
    elif kind == 2:  # spots: a few dark blobs
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0.15, 0.85, 2) * s
            r = rng.uniform(0.03, 0.07) * s
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(30, 25, 20))
    elif kind == 3:  # crack: jagged polyline
        x, y = rng.uniform(0.1, 0.9, 2) * s
        ang = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(12):
            ang += rng.normal(0, 0.6)
            x, y = x + 0.05 * s * math.cos(ang), y + 0.05 * s * math.sin(ang)
            pts.append((x, y))
        d.line(pts, fill=(20, 20, 20), width=max(1, s // 80))
    return np.asarray(pil)


def encode_jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_demo(
    out: str, n_train: int = 512, n_test_normal: int = 128, n_test_defect: int = 128,
    size: int = 96, per_shard: int = 128, seed: int = 0,
) -> tuple[DatasetInfo, DatasetInfo]:
    """Writes OUT/train (normal only) and OUT/test (labelled normal + defects). Deterministic."""
    from msc_dist import storage

    rng = np.random.default_rng(seed)
    with ShardWriter(storage.join(out, "train"), per_shard, CLASSES) as w:
        for i in range(n_train):
            w.write(f"train{i:06d}", encode_jpeg(texture(rng, size)), "jpg", 0)
    with ShardWriter(storage.join(out, "test"), per_shard, CLASSES) as w:
        for i in range(n_test_normal + n_test_defect):
            img = texture(rng, size)
            label = 0 if i < n_test_normal else int(1 + (i - n_test_normal) % 3)
            if label:
                img = add_defect(img, label, rng)
            w.write(f"test{i:06d}", encode_jpeg(img), "jpg", label)
    return describe(storage.join(out, "train")), describe(storage.join(out, "test"))
