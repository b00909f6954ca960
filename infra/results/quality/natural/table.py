"""The README's natural-image table (issue 26) from this folder's bench quality JSON files: ROC-AUC
per class (mean over the seeds each file ran) for the frozen kNN, `fast` before its collapse rule
(lr 1e-3, six epochs), `fast` as it is now (the rule stops it after epoch 1 where normal_cos rose
0.17), and `paper` where it ran. Run from the repository root:

    python infra/results/quality/natural/table.py
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ("automobile", "bird", "deer", "dog", "frog", "horse", "ship", "truck")
# (row label, method in the files, files merged in order, later ones winning)
ROWS = (
    ("`knn` (frozen)", "knn", ("lite0_knn.json",)),
    ("`fast` before the rule (seeds 0-2)", "msc-fast", ("lite0_fast_rest.json", "lite0_fast_dog.json")),
    ("`fast` now (seed 0)", "msc-fast", ("lite0_fast_stop.json",)),
    ("`paper`", "msc", ("lite0_paper_dog.json", "lite0_paper_rest.json", "lite0_paper_rest2.json")),
)


def per_class(method: str, files: tuple[str, ...]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in files:
        p = os.path.join(HERE, f)
        if os.path.exists(p):
            for c, m in json.load(open(p))["classes"].items():
                if method in m:
                    out[c] = m[method] | {"n_seeds": len(m[method].get("seeds", []))}
    return out


def main() -> int:
    knn = per_class("knn", ("lite0_knn.json",))
    print("| method | " + " | ".join(CLASSES) + " | mean | classes below kNN by > 0.005 | training s / seed |")
    print("|---" * (len(CLASSES) + 4) + "|")
    for label, method, files in ROWS:
        got = per_class(method, files)
        if not got:
            continue
        cells = [f"{got[c]['roc_auc']:.4f}" if c in got else "" for c in CLASSES]
        done = [c for c in CLASSES if c in got]
        mean = f"{sum(got[c]['roc_auc'] for c in done) / len(done):.4f}" if len(done) == len(CLASSES) else \
            f"({len(done)} of {len(CLASSES)})"
        below = [c for c in done if method != "knn" and got[c]["roc_auc"] < knn[c]["roc_auc"] - 0.005]
        secs = [got[c].get("train_seconds") for c in done if got[c].get("train_seconds") is not None]
        t = f"{sum(secs) / len(secs):.0f}" if secs else "0"
        print(f"| {label} | " + " | ".join(cells) + f" | {mean} | {', '.join(below) or 'none'} | {t} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
