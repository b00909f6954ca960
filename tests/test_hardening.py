"""Issue 23: what an input costs is bounded by what is decoded, inputs cannot hang a job, and
bad settings fail in one line before Ray starts."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from msc_dist.data.decode import crop_geometry, decode_image

# Runs in a fresh interpreter: everything imported and warmed up first, then the address space
# is capped at what it uses plus 150 MB, and the peak RSS is compared before and after.
_DECODE_PROBE = textwrap.dedent("""
    import io, json, resource, sys
    import numpy as np, torch
    from PIL import Image
    from msc_dist.data.decode import decode_image
    from msc_dist.data.device_decode import decode_batch
    torch.set_num_threads(1)

    def enc(w, h, fmt):
        buf = io.BytesIO()
        Image.new("L", (w, h), 77).save(buf, format=fmt)
        return buf.getvalue()

    small = enc(40, 30, "JPEG")
    decode_image(small, 96, resize_mode="center_crop"); decode_batch([small, enc(40, 30, "PNG")], 96, "cpu")
    vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")][0] * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 150 * 2**20, resource.RLIM_INFINITY))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = []
    for w, h, fmt in ((1, 60000, "PNG"), (60000, 1, "JPEG")):
        data = enc(w, h, fmt)
        for mode in ("center_crop", "squash"):
            a = decode_image(data, 96, resize_mode=mode)
            x, ok, err = decode_batch([data], 96, "cpu", resize_mode=mode)
            b = x[0].permute(1, 2, 0).numpy()
            out.append({"case": f"{w}x{h} {fmt} {mode}", "bytes": len(data), "pil": list(a.shape),
                        "device": list(b.shape), "err": [int(np.abs(a.astype(int) - 77).max()),
                                                         int(np.abs(b.astype(int) - 77).max())]})
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"cases": out, "peak_mb": peak}))
""")


def test_a_long_thin_image_decodes_small_in_bounded_memory():
    """Issue 23, 1: a 200-byte 1 x 60,000 PNG (and a 60,000 x 1 JPEG) used to be resized to
    109 x 6.5 M pixels before the center crop (990 MB; the device path 10 GB). Now they decode
    to the right 96 x 96 array under an address-space cap, with a peak RSS increase under 100 MB,
    in the PIL path and the device path alike."""
    p = subprocess.run([sys.executable, "-c", _DECODE_PROBE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res["cases"]) == 4
    for c in res["cases"]:
        assert c["pil"] == c["device"] == [96, 96, 3], c
        assert max(c["err"]) <= 2, c  # a uniform grey 77 stays 77 (JPEG: within 2)
    assert res["peak_mb"] < 100, res


def test_the_crop_region_alone_gives_the_pixels_of_resize_then_crop():
    """Beyond MAX_RESIZED_FACTOR x S x S, only the crop's region is resampled: within one grey
    level of resizing the whole image and cropping it (what torchvision does), on random pixels."""
    rng = np.random.default_rng(0)
    for w, h in ((7, 600), (600, 7), (40, 400)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        for size in (32, 64):
            (nw, nh), (left, top) = crop_geometry(w, h, size, "center_crop")
            assert nw * nh > 4 * size * size  # the region path
            ref = np.asarray(img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size)))
            got = decode_image(buf.getvalue(), size, resize_mode="center_crop")
            assert got.shape == ref.shape and np.abs(got.astype(int) - ref).max() <= 1, (w, h, size)
