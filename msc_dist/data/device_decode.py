"""Decoding on the training device: loader workers hand encoded bytes, JPEGs are decoded in one
batched call on the device (nvjpeg through ``torchvision.io.decode_jpeg(..., device="cuda")``; the
same call runs libjpeg-turbo on the CPU) and resized there with antialiasing. PNG and WebP keep
the PIL path. The pixel limit and the format are checked from the header, before any decode.

Same pixels as ``decode.decode_image`` within a stated tolerance, tested in tests/test_data.py:
the mean |difference| per image is under 2.5 grey levels (measured on the magnetic tiles: 0.23 at
64 px, 0.13 at 128 px, 0.18 at 224 px, either resize mode; 0 where no resize is needed). It is not
zero because PIL may decode a JPEG that is much larger than the target at a reduced DCT scale (down
to twice the target size) before resizing, where the device decodes in full and resizes with
antialiasing; single pixels at sharp edges can differ by more."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image

from msc_dist.data.decode import DEFAULT_MAX_PIXELS, BadImage, crop_box, crop_geometry, decode_image, open_image


def probe(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The image format from its header (no pixel is decoded): one of the decoder's allowed
    formats within ``max_pixels``, else BadImage (the same checks as ``decode_image``)."""
    return open_image(data, max_pixels).format


def _resize(x: torch.Tensor, size: int, resize_mode: str) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, size, size) uint8 by ``resize_mode``, bilinear with antialiasing
    (as PIL's resize), then the center crop where the mode has one. A long, thin image, whose
    whole resize would exceed ``decode.MAX_RESIZED_FACTOR`` x S x S pixels, has only the crop's
    region resampled, as the PIL path does (on the CPU: such images are rare)."""
    box = crop_box(x.shape[-1], x.shape[-2], size, resize_mode)
    if box is not None:
        img = Image.fromarray(x.permute(1, 2, 0).cpu().numpy()).resize((size, size), Image.BILINEAR, box=box)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).to(x.device)
    (nw, nh), crop = crop_geometry(x.shape[-1], x.shape[-2], size, resize_mode)
    if x.shape[-2:] != (nh, nw):
        y = F.interpolate(x[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = y[0].round_().clamp_(0, 255).to(torch.uint8)
    if crop is not None:
        x = x[:, crop[1]:crop[1] + size, crop[0]:crop[0] + size]
    return x


def _decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | Exception]:
    """One batched decode; if any image breaks it, each is decoded alone to find which."""
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; decode_jpeg
        # is still the batched nvjpeg call that ships with the pinned torchvision.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:
        out: list[torch.Tensor | Exception] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception as e:
                out.append(e)
        return out


def decode_batch(datas: list[bytes], size: int, device: torch.device | str,
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, resize_mode: str
                 ) -> tuple[torch.Tensor, list[int], dict[int, str]]:
    """Encoded images -> ((n, 3, size, size) uint8 on ``device``, channels_last, by
    ``resize_mode``; the indices of ``datas`` that it holds, in order; {index: error} for the others)."""
    device = torch.device(device)
    images: dict[int, torch.Tensor] = {}
    errors: dict[int, str] = {}
    jpegs = []
    for i, d in enumerate(datas):
        try:
            fmt = probe(d, max_pixels)
        except BadImage as e:
            errors[i] = str(e)
            continue
        if fmt == "JPEG":
            jpegs.append(i)
            continue
        try:  # PNG, WebP: PIL on the CPU, then one copy to the device
            arr = np.array(decode_image(d, size, max_pixels, resize_mode=resize_mode))  # PIL's array is read-only: one small copy
            images[i] = torch.from_numpy(arr).permute(2, 0, 1).to(device, non_blocking=True)
        except BadImage as e:
            errors[i] = str(e)
    for i, r in zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device)):
        if isinstance(r, Exception):
            errors[i] = f"not a decodable image: {type(r).__name__}: {r}"
        else:
            images[i] = _resize(r, size, resize_mode)
    ok = sorted(images)
    if not ok:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8, device=device), [], errors
    x = torch.stack([images[i] for i in ok]).contiguous(memory_format=torch.channels_last)
    return x, ok, errors


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def materialize(batch: dict, size: int, device: torch.device | str, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                resize_mode: str) -> dict:
    """A loader batch of encoded bytes (``encoded``) -> the usual batch with ``images`` on the
    device; images that fail to decode leave the batch and join ``corrupt``."""
    if "encoded" not in batch:
        return batch
    x, ok, errors = decode_batch(batch["encoded"], size, device, max_pixels, resize_mode=resize_mode)
    keys = batch["keys"]
    return {
        "images": x,
        "labels": batch["labels"][ok] if len(ok) else batch["labels"][:0],
        "keys": [keys[i] for i in ok],
        "sources": [batch["sources"][i] for i in ok],
        "corrupt": list(batch["corrupt"]) + [keys[i] for i in sorted(errors)],
    }
