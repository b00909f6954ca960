"""python -m msc_dist.data {make-shards, demo, describe}"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msc_dist.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-shards", help="image folder (subfolders = classes) or MNIST npz -> shards")
    m.add_argument("--from", dest="src", required=True, help="DIR with class subfolders, or an .npz")
    m.add_argument("--out", required=True, help="DIR or s3://bucket/prefix")
    m.add_argument("--exts", nargs="+", default=None, help="image extensions to take (e.g. jpg to skip .png masks)")
    m.add_argument("--per-shard", type=int, default=1000)
    m.add_argument("--normal-class", default=None,
                   help="write OUT/train (normal only) and OUT/test; folders get a seeded split")
    m.add_argument("--train-fraction", type=float, default=0.7)
    m.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("demo", help="generate the embedded demo set (procedural textures with defects)")
    d.add_argument("--out", required=True)
    d.add_argument("--n-train", type=int, default=512)
    d.add_argument("--n-test-normal", type=int, default=128)
    d.add_argument("--n-test-defect", type=int, default=128)
    d.add_argument("--size", type=int, default=96)
    d.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("describe", help="shard counts and labels")
    s.add_argument("data")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from msc_dist.data.shards import DataError

    try:
        if a.cmd == "make-shards":
            from msc_dist.data.make_shards import make_shards

            res = make_shards(a.src, a.out, a.exts, a.per_shard, a.normal_class, a.train_fraction, a.seed)
            summary = {k: {"samples": v.count, "shards": len(v.shards), "labels": _labels(v)} for k, v in res.items()}
        elif a.cmd == "demo":
            from msc_dist.data.demo import make_demo

            tr, te = make_demo(a.out, a.n_train, a.n_test_normal, a.n_test_defect, a.size, seed=a.seed)
            summary = {"train": {"samples": tr.count, "labels": _labels(tr)}, "test": {"samples": te.count, "labels": _labels(te)}}
        else:
            from msc_dist.data.shards import describe

            info = describe(a.data)
            summary = {"samples": info.count, "shards": len(info.shards), "classes": info.classes, "labels": _labels(info)}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


def _labels(info) -> dict:
    return {str(k): v for k, v in sorted(info.label_counts().items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}


if __name__ == "__main__":
    sys.exit(main())
