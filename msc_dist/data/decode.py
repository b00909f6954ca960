"""Safe, fast image decoding shared by training, embedding, scoring and serving.

Only the formats in ``formats`` reach a decoder (JPEG, PNG, WebP by default): Pillow would
otherwise try every plugin it has on untrusted bytes (TIFF, BMP, ICO, TGA, PCX, SGI, GIF, DDS,
QOI, IM, EPS -- the last hands the bytes to Ghostscript where it is installed)."""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# Decompression-bomb guard: refuse images above this many pixels before decoding them.
DEFAULT_MAX_PIXELS = 64_000_000
# Pillow format ids that decode_image accepts unless told otherwise.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")
# How an image becomes the model's S x S input. ``center_crop`` (the paper's test transform, the
# default for every image that is embedded rather than trained on): the shorter side resized to
# S * 256 / 224, then the central S x S. ``squash``: the whole image resized to S x S (aspect
# ratio lost, nothing cut off; training views are random crops of this whole image).
RESIZE_MODES = ("center_crop", "squash")
# Center crop of a long, thin image: resizing its shorter side to S * 256 / 224 makes the longer
# one huge (a 1 x 60,000 PNG at S = 96 would be resized to 109 x 6,540,000 pixels: 990 MB for a
# 196-byte file). The whole resized image is materialised only while it holds at most this many
# times S x S pixels (aspect ratios up to about 3.4 : 1); beyond, only the source region under the
# crop is resampled, straight to S x S (PIL's resize box: no intermediate image; pixels within 1
# grey level of resize-then-crop). Either way a decode materialises at most the source (within
# max_pixels), one RGB copy of it, and 4 x S x S pixels.
MAX_RESIZED_FACTOR = 4


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {mode!r}")
    return mode


def crop_geometry(w: int, h: int, size: int, mode: str) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """((resized w, h), (left, top) of the S x S crop or None) for an image of w x h, exactly as
    torchvision's Resize(int(S * 256 / 224)) then CenterCrop(S) compute them."""
    if check_resize_mode(mode) == "squash":
        return (size, size), None
    short = int(size * 256 / 224)
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    return (nw, nh), (int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0)))


def crop_box(w: int, h: int, size: int, mode: str) -> tuple[float, float, float, float] | None:
    """The region of a w x h image that becomes the S x S crop, in its own pixel coordinates,
    when resizing the whole image first would materialise more than MAX_RESIZED_FACTOR x S x S
    pixels; None when the whole resize is small enough (or the mode resizes straight to S x S)."""
    (nw, nh), crop = crop_geometry(w, h, size, mode)
    if crop is None or nw * nh <= MAX_RESIZED_FACTOR * size * size:
        return None
    sx, sy = w / nw, h / nh
    return (crop[0] * sx, crop[1] * sy, (crop[0] + size) * sx, (crop[1] + size) * sy)


class BadImage(ValueError):
    """The bytes are not a decodable image within limits; the message says why."""


class UnsupportedFormat(BadImage):
    """An image, but in a format outside the allow-list (serving answers 415)."""


class TooManyPixels(BadImage):
    """An image above the pixel limit (serving answers 413)."""


def sniff_format(data: bytes) -> str | None:
    """The Pillow format id whose magic bytes match ``data``, or None. Only the plugins' prefix
    checks run (no parser), so this is safe on any input; it names the format in 415 errors."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        _factory, accept = Image.OPEN[fmt]
        try:
            hit = accept is not None and accept(prefix)
        except Exception:  # a prefix check that trips on short input is no match
            continue
        if hit and not isinstance(hit, str):  # a str is Pillow's "maybe" warning, not a match
            return fmt
    return None


def open_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS) -> Image.Image:
    """Parse the header only (no pixel data yet): an allowed format within ``max_pixels``."""
    if not data:
        raise BadImage("empty image")
    allowed = tuple(f.upper() for f in formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=allowed)
    except Image.UnidentifiedImageError:
        found = sniff_format(data)
        if found and found not in allowed:
            raise UnsupportedFormat(f"{found} images are not accepted; accepted formats: {', '.join(allowed)}") from None
        raise BadImage(f"not a decodable image (accepted formats: {', '.join(allowed)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooManyPixels(f"decompression bomb: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad headers
        raise BadImage(f"not a decodable image: {type(e).__name__}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise TooManyPixels(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
    return img


def decode_image(data: bytes | None, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS, resize_mode: str) -> np.ndarray:
    """Encoded bytes -> (size, size, 3) uint8 RGB by ``resize_mode`` (see RESIZE_MODES; no default:
    it is the model's, from its ``Preprocess``). ``formats``: the Pillow format ids allowed
    (others raise UnsupportedFormat)."""
    return to_array(open_image(data, max_pixels, formats), size, resize_mode)


def to_array(img: Image.Image, size: int, resize_mode: str) -> np.ndarray:
    """An image from ``open_image`` decoded to (size, size, 3) uint8 RGB by ``resize_mode``."""
    try:
        (nw, nh), crop = crop_geometry(*img.size, size, resize_mode)
        # JPEG: let libjpeg downscale by 1/2..1/8 during decode (much cheaper than decoding full
        # size), but only down to twice the size the bilinear resize then makes: a DCT-domain
        # downscale straight to the target size blurs differently from an antialiased resize, and
        # that cost 1 ROC-AUC point on the magnetic tiles at 64 px (frozen kNN 0.9150 against
        # 0.9254 for a full decode; 0.9250 with this 2x margin, which is also the reducing_gap that
        # PIL's thumbnail() keeps by default). Cost: 0.67x the decode rate of 3-Mpixel JPEGs at 224 px.
        img.draft("RGB", (2 * min(nw, nh), 2 * min(nw, nh)))
        img.load()  # decode now, inside this try: truncated data raises here
        # Grayscale is resized before it becomes RGB (a third of the work, identical pixels:
        # bilinear resizing is per channel); other modes (palette, alpha, CMYK) convert first.
        # convert() copies even when there is nothing to convert, so it runs only when needed.
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        box = crop_box(*img.size, size, resize_mode)  # of the drafted size: the same region
        if box is not None:  # a long, thin image: the crop's region alone, straight to S x S
            img, crop = img.resize((size, size), Image.BILINEAR, box=box), None
        elif img.size != (nw, nh):
            img = img.resize((nw, nh), Image.BILINEAR)
        if crop is not None:
            img = img.crop((crop[0], crop[1], crop[0] + size, crop[1] + size))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise BadImage(f"not a decodable image: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model's input: a contract of the checkpoint (its model card), never
    a default. ``image_size`` and ``resize_mode`` make any image an S x S uint8 RGB array; ``mean``
    and ``std`` are the normalisation the model applies inside its forward (recorded here so
    that an export or an API client can state the whole input contract). Every path that embeds
    an image (the center pass, evaluation, the embedding and score jobs, the Scorer, both
    serving layouts, predict/test/export) decodes through one of these, built from the checkpoint
    by ``msc_dist.card.preprocess_of``."""

    image_size: int
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        check_resize_mode(self.resize_mode)
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be at least 1, got {self.image_size}")
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def open(self, data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
             formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS) -> Image.Image:
        """The header only (format and pixel limits checked, no pixel decoded): ``open_image``."""
        return open_image(data, max_pixels, formats)

    def __call__(self, image: bytes | Image.Image | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS) -> np.ndarray:
        """Encoded bytes, or an image from ``open``, -> (S, S, 3) uint8 RGB."""
        if isinstance(image, Image.Image):
            return to_array(image, self.image_size, self.resize_mode)
        return decode_image(image, self.image_size, max_pixels, formats=formats, resize_mode=self.resize_mode)

    def check(self, images: np.ndarray | list[np.ndarray]) -> None:
        """Raise unless every (S, S, 3) array is of this size: an image made for another card is
        never resized to fit (it is scored by the version it was decoded for)."""
        for im in images:
            if tuple(im.shape[:2]) != (self.image_size, self.image_size):
                raise ValueError(f"an image of {im.shape[1]}x{im.shape[0]} was decoded for another model; this one "
                                 f"takes {self.image_size}x{self.image_size} ({self.resize_mode})")

    def describe(self) -> str:
        """The preprocessing in words (export specs, API clients)."""
        s = self.image_size
        if self.resize_mode == "squash":
            return f"decode, convert to RGB, resize to {s}x{s} (bilinear, no crop)"
        return (f"decode, convert to RGB, resize the shorter side to {int(s * 256 / 224)} (bilinear), "
                f"center-crop {s}x{s}")

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), str(d["resize_mode"]), tuple(d["mean"]), tuple(d["std"]))
