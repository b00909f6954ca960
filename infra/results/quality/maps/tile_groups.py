"""The magnetic tiles' groups file: which photos show the same physical tile.

    python infra/results/quality/maps/tile_groups.py > infra/results/quality/maps/tile_groups.json

The dataset photographs each tile six times, under six exposures, and names each photo
``MT_<Type>/Imgs/exp<E>_num_<frame>.jpg``: the six exposures (E = 1..6) of one tile have
consecutive frame numbers, within about 200 of each other, and the next tile starts further on
(MT_Free: 952 photos, 150 groups, 125 of them exactly six). Written for
``msc data make-shards --groups`` / ``bench quality --groups`` / ``msc evaluate --groups``, which then
put all six photos of a normal tile on the same side of the split.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

GAP = 200  # frame numbers: one tile's exposures are closer than this, the next tile is further


def groups(data: str, gap: int = GAP) -> dict[str, str]:
    out = {}
    for cls in sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d))):
        frames = []
        for f in os.listdir(os.path.join(data, cls, "Imgs")):
            m = re.fullmatch(r"exp\d+_num_(\d+)\.jpg", f)
            if m:
                frames.append((int(m.group(1)), f"{cls}/Imgs/{f}"))
        last, n = None, -1
        for frame, rel in sorted(frames):
            if last is None or frame - last > gap:
                n += 1
            out[rel] = f"{cls}/tile{n:03d}"
            last = frame
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/magnetic-tile")
    ap.add_argument("--gap", type=int, default=GAP)
    a = ap.parse_args(argv)
    json.dump(groups(a.data, a.gap), sys.stdout, indent=0, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
