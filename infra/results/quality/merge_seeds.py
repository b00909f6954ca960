"""Merge `bench quality` JSON files of the same settings that ran different seeds (one run per
seed, so a killed run loses one seed, not all) into one file, as if one run had taken every seed:
each class's method gets the mean and spread over all its seeds (`bench.quality._over_seeds`) and
the means over classes are recomputed. The inputs must agree on everything but the seed. Run from
the repository root:

    python infra/results/quality/merge_seeds.py OUT.json IN_SEED0.json IN_SEED1.json ...
"""

from __future__ import annotations

import json
import sys

import numpy as np


def merge(results: list[dict]) -> dict:
    from msc_dist.bench.quality import METRICS, PATCH_METRICS, _over_seeds

    first = results[0]
    keep = {k: v for k, v in first["config"].items() if k != "seed"}
    for r in results[1:]:
        other = {k: v for k, v in r["config"].items() if k != "seed"}
        diff = sorted(k for k in keep.keys() | other.keys() if keep.get(k) != other.get(k))
        if diff:
            raise SystemExit(f"the inputs differ in more than the seed: {diff}")
    seeds = [s for r in results for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"a seed comes twice: {seeds}")
    classes = [c for c in first["classes"] if all(c in r["classes"] for r in results)]
    methods = [m for m in first["classes"][classes[0]] if all(m in r["classes"][c] for r in results for c in classes)]
    per_class = {c: {m: _over_seeds([s for r in results for s in r["classes"][c][m]["seeds"]]) for m in methods}
                 for c in classes}
    mean: dict = {}
    for m in methods:
        mean[m] = {k: float(np.mean([per_class[c][m][k] for c in classes])) for k in METRICS + PATCH_METRICS
                   if all(k in per_class[c][m] for c in classes)}
        by_seed = [np.mean([per_class[c][m]["seeds"][i]["roc_auc"] for c in classes]) for i in range(len(seeds))]
        mean[m]["roc_auc_std"] = float(np.std(by_seed))
        mean[m]["seconds"] = float(np.mean([per_class[c][m].get("seconds", 0.0) for c in classes]))
    return first | {"classes": per_class, "mean": mean, "seeds": seeds,
                    "seconds": float(sum(r["seconds"] for r in results)),
                    "merged_from_seeds": [r["seeds"] for r in results]}


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    results = []
    for p in argv[1:]:
        with open(p) as f:
            results.append(json.load(f))
    with open(argv[0], "w") as f:
        json.dump(merge(results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
