"""Safe, fast image decoding shared by training, embedding and serving."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Decompression-bomb guard: refuse images above this many pixels before decoding them.
DEFAULT_MAX_PIXELS = 64_000_000


class BadImage(ValueError):
    """The bytes are not a decodable image within limits; the message says why."""


def decode_image(data: bytes | None, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> (size, size, 3) uint8 RGB, squashed to a square as Resize((s, s)) does."""
    if not data:
        raise BadImage("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
            # JPEG: let libjpeg downscale by 1/2..1/8 during decode (much cheaper than decoding full size).
            img.draft("RGB", (size, size))
            img.load()  # decode now, inside this try: truncated data raises here
            # Grayscale is resized before it becomes RGB (a third of the work, identical pixels:
            # bilinear resizing is per channel); other modes (palette, alpha, CMYK) convert first.
            # convert() copies even when there is nothing to convert, so it runs only when needed.
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise BadImage(f"not a decodable image: {type(e).__name__}: {e}") from e
