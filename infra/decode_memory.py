"""Peak memory of one decode, each case in a fresh interpreter (the README's threat model):
``python infra/decode_memory.py`` from the repository root. One line per case: the image, its
encoded bytes, the output shape, and the peak RSS increase over the interpreter's imports."""

from __future__ import annotations

import json
import subprocess
import sys

CASE = """
import json, resource, subprocess, sys, tempfile, time
w, h, mode, fmt, size, resize, path = {args!r}
with tempfile.NamedTemporaryFile() as f:  # encoded in another process: its pixels never count here
    subprocess.run([sys.executable, "-c", "import sys; from PIL import Image; "
                    f"Image.new({{mode!r}}, ({{w}}, {{h}}), 77).save(sys.argv[1], format={{fmt!r}})", f.name], check=True)
    data = open(f.name, "rb").read()
from msc_dist.data.decode import decode_image
if path == "device":
    from msc_dist.data.device_decode import decode_batch
    decode_batch([b"x"], size, "cpu")  # imports
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if path == "device":
    x, ok, err = decode_batch([data], size, "cpu", max_pixels=64_000_000, resize_mode=resize)
    shape = list(x.shape)
else:
    shape = list(decode_image(data, size, 64_000_000, resize_mode=resize).shape)
print(json.dumps({{"image": f"{{w}} x {{h}} {{mode}} {{fmt}}", "bytes": len(data), "path": path, "resize": resize,
                  "out": shape, "seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_increase_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)}}))
"""

CASES = [
    (1, 60000, "L", "PNG", 96, "center_crop", "pil"), (60000, 1, "L", "JPEG", 96, "center_crop", "pil"),
    (1, 60000, "L", "PNG", 96, "center_crop", "device"), (60000, 1, "L", "JPEG", 96, "center_crop", "device"),
    (1, 4_000_000, "L", "PNG", 96, "center_crop", "pil"),
    # The source's own cost at the jobs' pixel limit (64 M): the bound per decode.
    (8000, 8000, "RGB", "PNG", 224, "center_crop", "pil"), (8000, 8000, "RGBA", "PNG", 224, "center_crop", "pil"),
    (8000, 8000, "LA", "PNG", 224, "center_crop", "pil"),
]

if __name__ == "__main__":
    for c in CASES:
        p = subprocess.run([sys.executable, "-c", CASE.format(args=c)], capture_output=True, text=True)
        print(p.stdout.strip() if p.returncode == 0 else json.dumps({"case": c, "error": p.stderr.strip()[-300:]}),
              flush=True)
