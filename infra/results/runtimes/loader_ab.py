"""The loader's two kinds side by side on a CPU (README, "CPU inference runtimes"): the path from
shards to features with the decoding in DataLoader worker processes (what a CPU device used
before 2026-12-07, and what a GPU uses) and in the same number of threads of this process
(``ThreadLoader``, what a CPU device uses now), each runtime's forward alone beside them, the
kinds and runtimes alternated in each round. One JSON line per (runtime, kind). From the
repository root:

    python infra/results/runtimes/loader_ab.py --size 224 --images 384 --rounds 3 > infra/results/runtimes/loader_ab_224px.jsonl
    python infra/results/runtimes/loader_ab.py --size 64 --images 2048 --rounds 3 > infra/results/runtimes/loader_ab_64px.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

from msc_dist import checkpoint as ckpt
from msc_dist.backbones import build_model
from msc_dist.bench.train import shard_counts
from msc_dist.card import load_card
from msc_dist.data.loader import LabelFilter, ShardStream, make_loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="loader workers (processes or threads)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", nargs="+", default=["onnxruntime", "openvino"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counts = shard_counts(tmp, None, a.images, a.size)
        stream = ShardStream(counts, LabelFilter(None), a.size, a.batch_size, resize_mode="squash")
        model = build_model("efficientnet_lite0", pretrained=True)
        ck = os.path.join(tmp, "checkpoint")
        ckpt.save(ck, model.state_dict(), torch.nn.functional.normalize(torch.ones(model.dim), dim=0),
                  {"backbone": "efficientnet_lite0", "image_size": a.size, "resize_mode": "squash"}, {"epoch": 0})
        cards = {r: load_card(ck, torch.device("cpu"), r, cache=os.path.join(tmp, "runtimes")) for r in a.runtime}
        # the loader's layout: (b, 3, S, S) channels_last strides
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (a.batch_size, a.size, a.size, 3),
                                                               dtype=np.uint8)).permute(0, 3, 1, 2)
        kinds = {"processes": False, "threads": True}

        def path(card, threads: bool) -> float:
            t0, n = time.perf_counter(), 0
            for b in make_loader(stream, a.workers, threads=threads):
                card.embed(b["images"])
                n += int(b["images"].shape[0])
            return n / (time.perf_counter() - t0)

        def alone(card) -> float:
            reps = max(3, a.images // a.batch_size)  # as many images as the path embeds
            t0 = time.perf_counter()
            for _ in range(reps):
                card.embed(x)
            return reps * a.batch_size / (time.perf_counter() - t0)

        for card in cards.values():  # warm-up: page cache, the runtimes' first calls
            path(card, True)
            alone(card)
        got = {(r, k): [] for r in cards for k in kinds}
        model = {(r, k): [] for r in cards for k in kinds}
        for _ in range(a.rounds):
            for r, card in cards.items():
                for k, threads in kinds.items():
                    got[r, k].append(path(card, threads))
                    model[r, k].append(alone(card))
    for (r, k), v in got.items():
        p, m = float(np.median(v)), float(np.median(model[r, k]))
        print(json.dumps({"bench": "loader_ab", "runtime": r, "loader": k, "workers": a.workers, "image_size": a.size,
                          "batch_size": a.batch_size, "images_per_s": p, "model_images_per_s": m, "path_over_model": p / m,
                          "rounds": [round(t, 1) for t in v], "model_rounds": [round(t, 1) for t in model[r, k]],
                          "machine": f"{platform.machine()} x{os.cpu_count()} CPU"}))


if __name__ == "__main__":
    main()
