"""Pixel masks of shard samples (``KEY.mask.png``, white = defect), brought onto the model's input.

A mask lines up with the anomaly map (the card's S x S input) when it goes through the image's
own ``Preprocess`` geometry (the same resize and center crop, ``crop_geometry`` / ``crop_box``)
with nearest-neighbour resampling, so it stays binary. A mask that cannot be used is never
guessed at: ``sample_mask`` says why (``MaskSkip``) and the caller counts and logs it
(``MaskSkips``); it never becomes a wrong metric."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from msc_dist.data.decode import DEFAULT_MAX_PIXELS, BadImage, Preprocess, crop_box, crop_geometry, open_image

log = logging.getLogger(__name__)

MASK_FORMATS = ("PNG",)
# Why a sample's mask is left out of the pixel metrics (the keys of MaskSkips.counts).
SKIP_KINDS = ("orphan", "undecodable", "wrong_size", "missing")


class MaskSkip(ValueError):
    """A mask that cannot be used; ``kind`` is one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def mask_array(data: bytes | None, preprocess: Preprocess, image_size: tuple[int, int],
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG mask bytes -> (S, S) bool (True = defect: grey level above 127), through the geometry of
    ``preprocess`` with nearest-neighbour resampling. ``image_size``: the (width, height) of the
    mask's image as decoded from its own bytes; a mask of another size raises MaskSkip."""
    try:
        img = open_image(data, max_pixels, MASK_FORMATS)
    except BadImage as e:
        raise MaskSkip("undecodable", f"mask does not decode: {e}") from None
    if tuple(img.size) != tuple(image_size):
        raise MaskSkip("wrong_size", f"mask is {img.size[0]}x{img.size[1]} but its image is "
                                     f"{image_size[0]}x{image_size[1]}")
    size, mode = preprocess.image_size, preprocess.resize_mode
    try:
        img.load()
        img = img.convert("L")
        (nw, nh), crop = crop_geometry(*img.size, size, mode)
        box = crop_box(*img.size, size, mode)
        if box is not None:  # a long, thin image: the crop's region straight to S x S, as the image
            img, crop = img.resize((size, size), Image.NEAREST, box=box), None
        elif img.size != (nw, nh):
            img = img.resize((nw, nh), Image.NEAREST)
        if crop is not None:
            img = img.crop((crop[0], crop[1], crop[0] + size, crop[1] + size))
        return np.asarray(img, dtype=np.uint8) > 127
    except Exception as e:  # truncated or corrupt pixel data
        raise MaskSkip("undecodable", f"mask does not decode: {type(e).__name__}: {e}") from None


@dataclass
class MaskSkips:
    """Counts of masks left out, by kind; each skip is logged once, one line."""

    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in SKIP_KINDS})

    def add(self, key: str, skip: MaskSkip) -> None:
        self.counts[skip.kind] = self.counts.get(skip.kind, 0) + 1
        log.warning("mask of %s skipped (%s): %s", key, skip.kind, skip)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def sample_mask(sample, preprocess: Preprocess, anomalous: bool,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The (S, S) bool mask of a shard sample read with ``masks=True``. A normal sample without a
    mask is all normal (all False, MVTec AD's convention for good images); raises MaskSkip for a
    mask without an image (orphan), an anomalous sample without a mask (missing: its defect
    pixels are unknown), and a mask that does not decode or whose size is not its image's."""
    if sample.data is None:
        raise MaskSkip("orphan", "mask without an image" if sample.has_mask else "no image")
    if sample.mask is None:
        if sample.has_mask:  # there, but not read (above the member size limit)
            raise MaskSkip("undecodable", "mask member was not read (above the size limit)")
        if anomalous:
            raise MaskSkip("missing", "anomalous sample without a mask")
        s = preprocess.image_size
        return np.zeros((s, s), bool)
    try:
        size = open_image(sample.data, max_pixels).size
    except BadImage as e:
        raise MaskSkip("orphan", f"its image does not decode: {e}") from None
    return mask_array(sample.mask, preprocess, size, max_pixels)
