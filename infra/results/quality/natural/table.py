"""The README's natural-image table (issue 26) from this folder's bench quality JSON files: ROC-AUC
per class (mean over the seeds each file ran) for the frozen kNN, `fast` before its collapse rule
(lr 1e-3, six epochs), `fast` as it is now (the rule stops it after epoch 1 where normal_cos rose
0.17), `paper`, `natural`, the same presets on EfficientNet-Lite1 and the frozen kNN of Lite1 and
Lite2, where they ran.
"Below kNN" compares each row with the frozen kNN of its own backbone. Run from the repository
root:

    python infra/results/quality/natural/table.py            # the natural-image table
    python infra/results/quality/natural/table.py --presets  # each preset on the three kinds of data
    python infra/results/quality/natural/table.py --backbones  # Lite0/1/2: frozen kNN and images/s
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ("automobile", "bird", "deer", "dog", "frog", "horse", "ship", "truck")
LITE0_KNN = (("lite0_knn.json", "knn"),)
LITE1_KNN = (("lite1_knn.json", "knn"), ("lite1_knn_seeds12.json", "knn"))
# (row label, (file, method) pairs merged in order with later ones winning, the kNN row it is held to)
ROWS = (
    ("`knn` (frozen)", LITE0_KNN, LITE0_KNN),
    ("`fast` before the rule", (("lite0_fast_rest.json", "msc-fast"), ("lite0_fast_dog.json", "msc-fast")),
     LITE0_KNN),
    ("`fast` now", (("lite0_fast_stop.json", "msc-fast"), ("lite0_fast_stop_seeds12_a.json", "msc-fast"),
                    ("lite0_fast_stop_seeds12_b.json", "msc-fast")), LITE0_KNN),
    ("`paper`", (("lite0_paper_dog.json", "msc"), ("lite0_paper_rest.json", "msc"), ("lite0_paper_rest2.json", "msc"),
                 ("lite0_paper_rest3.json", "msc"), ("lite0_paper_seeds12_a.json", "msc"),
                 ("lite0_paper_seeds12_b.json", "msc")), LITE0_KNN),
    # the lr sweep at 3e-5 (constant, 6 epochs: the preset's schedule, evaluated every epoch) and msc-natural
    ("`natural`", (("sweep_natural_3e-5_constant.json", "msc"), ("lite0_natural_rest.json", "msc-natural"),
                   ("lite0_natural_dog12.json", "msc-natural"), ("lite0_natural_seeds12_a.json", "msc-natural"),
                   ("lite0_natural_seeds12_b.json", "msc-natural")), LITE0_KNN),
    ("Lite1 `knn` (frozen)", LITE1_KNN, LITE1_KNN),
    ("Lite1 `fast` now", tuple((f"lite1_fast_{x}.json", "msc-fast") for x in ("a", "b", "seeds12_a", "seeds12_b")),
     LITE1_KNN),
    ("Lite1 `paper`", tuple((f"lite1_paper_{x}.json", "msc") for x in ("a", "b", "seeds12_a", "seeds12_b")), LITE1_KNN),
    ("Lite1 `natural`", (("lite1_natural.json", "msc-natural"),)
     + tuple((f"lite1_natural_seeds12_{x}.json", "msc-natural") for x in "abcd"), LITE1_KNN),
    ("Lite2 `knn` (frozen)", (("lite2_knn.json", "knn"),), (("lite2_knn.json", "knn"),)),
)


def per_class(sources: tuple[tuple[str, str], ...]) -> dict[str, dict[int, dict]]:
    """class -> seed -> that seed's run, merged over the files (a later file's seed wins)."""
    out: dict[str, dict[int, dict]] = {}
    for f, method in sources:
        p = os.path.join(HERE, f)
        if not os.path.exists(p):
            continue
        with open(p) as fh:
            res = json.load(fh)
        for c, m in res["classes"].items():
            if method in m:
                out.setdefault(c, {}).update(zip(res["seeds"], m[method]["seeds"]))
    return out


def seeds_of(got: dict[str, dict[int, dict]]) -> str:
    """'seeds 0-2' where every class ran seeds 0, 1, 2; else which class ran which."""
    sets = {tuple(sorted(r)) for r in got.values()}
    if len(sets) == 1:
        (s,) = sets
        return f"seed {s[0]}" if len(s) == 1 else f"seeds {s[0]}-{s[-1]}" if s == tuple(range(s[0], s[-1] + 1)) \
            else "seeds " + ", ".join(map(str, s))
    return "; ".join(f"{c}: seeds {', '.join(map(str, sorted(r)))}" for c, r in sorted(got.items()))


def mean(runs: dict[int, dict], key: str = "roc_auc") -> float:
    return sum(r[key] for r in runs.values()) / len(runs)


def main() -> int:
    print("| method | " + " | ".join(CLASSES) + " | mean | classes below kNN by > 0.005 | training s / seed |")
    print("|---" * (len(CLASSES) + 4) + "|")
    for label, sources, knn_sources in ROWS:
        got, knn = per_class(sources), per_class(knn_sources)
        if not got:
            continue
        cells = [f"{mean(got[c]):.4f}" if c in got else "" for c in CLASSES]
        done = [c for c in CLASSES if c in got]
        avg = f"{sum(mean(got[c]) for c in done) / len(done):.4f}" if len(done) == len(CLASSES) else \
            f"({len(done)} of {len(CLASSES)})"
        # held to the frozen kNN of the same seeds (the same 70/30 split and hold-out)
        below = [c for c in done if sources != knn_sources
                 and mean(got[c]) < mean({s: knn[c][s] for s in got[c]}) - 0.005]
        secs = [r["train_seconds"] for c in done for r in got[c].values() if r.get("train_seconds") is not None]
        t = f"{sum(secs) / len(secs):.0f}" if secs else "0"
        print(f"| {label} ({seeds_of(got)}) | " + " | ".join(cells) + f" | {avg} | {', '.join(below) or 'none'} | {t} |")
    return 0


SOURCES = {label: sources for label, sources, _ in ROWS}  # the natural-set rows of KINDS, by label
Q = os.path.dirname(HERE)
# kind of data -> preset -> (file, method) pairs, as ROWS; files outside this folder are named from it
KINDS = {
    "MNIST, 10 digits": {
        "knn": (("../mnist_digits.json", "knn"),), "paper": (("../mnist_digits.json", "msc"),),
        "fast": (("../mnist_digits.json", "msc-fast"),), "natural": (("mnist_digits_natural.json", "msc-natural"), ("mnist_digits_natural_seeds12.json", "msc-natural"))},
    "magnetic tiles": {
        "knn": (("../magnetic_tiles.json", "knn"),), "paper": (("../magnetic_tiles.json", "msc"),),
        "fast": (("../magnetic_tiles.json", "msc-fast"),), "natural": (("magnetic_tiles_natural.json", "msc-natural"),)},
    "natural, 8 classes": {
        "knn": LITE0_KNN, "paper": SOURCES["`paper`"], "fast": SOURCES["`fast` now"], "natural": SOURCES["`natural`"]},
    "natural, 8 classes, Lite1": {
        "knn": LITE1_KNN, "paper": SOURCES["Lite1 `paper`"], "fast": SOURCES["Lite1 `fast` now"],
        "natural": SOURCES["Lite1 `natural`"]},
}


def presets() -> int:
    """Each kind of data over the seeds every preset ran on every class (so each column averages the
    same runs): the mean over classes, the classes whose mean over those seeds is more than 0.005
    below the frozen kNN's, and training seconds per run."""
    print("| data | seeds | `knn` | `paper` | `fast` | `natural` | below kNN by > 0.005 "
          "(paper / fast / natural) | training s, paper / fast / natural |")
    print("|---" * 8 + "|")
    for kind, rows in KINDS.items():
        runs = {p: per_class(src) for p, src in rows.items()}
        classes = sorted(runs["knn"])
        seeds = sorted(set.intersection(*(set(r[c]) if c in r else set() for r in runs.values() for c in classes)))
        if not seeds:
            print(f"{kind}: no seed that every preset ran on every class; its row is left out", file=sys.stderr)
            continue
        at = {p: {c: [r[c][s] for s in seeds] for c in classes} for p, r in runs.items()}
        auc = {p: {c: sum(x["roc_auc"] for x in v) / len(v) for c, v in a.items()} for p, a in at.items()}
        cells = [f"{sum(auc[p].values()) / len(classes):.4f}" for p in ("knn", "paper", "fast", "natural")]
        below = [", ".join(c for c in classes if auc[p][c] < auc["knn"][c] - 0.005) or "none"
                 for p in ("paper", "fast", "natural")]
        secs = []
        for p in ("paper", "fast", "natural"):
            t = [x["train_seconds"] for v in at[p].values() for x in v]
            secs.append(f"{sum(t) / len(t):.0f}")
        print(f"| {kind} | {', '.join(map(str, seeds))} | " + " | ".join(cells)
              + f" | {' / '.join(below)} | {' / '.join(secs)} |")
    return 0


def seed0_knn(*files: str) -> dict[str, float]:
    """class -> the frozen kNN's seed-0 ROC-AUC, merged over ``files`` (later files win)."""
    return {c: r[0]["roc_auc"] for c, r in per_class(tuple((f, "knn") for f in files)).items() if 0 in r}


def backbones() -> int:
    """Frozen kNN (seed 0) of each backbone: the mean over the eight classes at 64 and 128 px (where
    every class ran), dog at 64 px, 128 px and the backbone's native size; and embedding images/s
    on this CPU (backbone_speed.log, the mean of its rounds)."""
    speed: dict[tuple[str, int], list[float]] = {}
    with open(os.path.join(HERE, "backbone_speed.log")) as f:
        for line in f:
            r = json.loads(line)
            speed.setdefault((r["backbone"], r["image_size"]), []).append(r["images_per_s"])
    native = {"lite0": 224, "lite1": 240, "lite2": 260}
    print("| backbone | kNN mean, 8 classes, 64 px | 128 px | dog 64 px | dog 128 px | dog native | images/s 64 px "
          "| 128 px | native |")
    print("|---" * 9 + "|")
    for b, n in native.items():
        at64 = seed0_knn(f"{b}_knn.json")
        at128 = seed0_knn(*(f"{b}_knn_128px{x}.json" for x in ("", "_rest_a", "_rest_b")))
        atn = seed0_knn(f"{b}_knn_{n}px.json")
        mean64, mean128 = (f"{sum(a.values()) / len(a):.4f}" if len(a) == len(CLASSES) else f"({len(a)} of 8)"
                           for a in (at64, at128))

        def ips(size: int, b=b) -> str:
            v = speed.get((f"efficientnet_{b}", size), [])
            return f"{sum(v) / len(v):.0f}" if v else ""

        dog128 = f"{at128['dog']:.4f}" if "dog" in at128 else ""
        dogn = f"{atn['dog']:.4f} ({n} px)" if "dog" in atn else ""
        print(f"| efficientnet_{b} | {mean64} | {mean128} | {at64.get('dog', 0):.4f} | {dog128} | {dogn} | {ips(64)} "
              f"| {ips(128)} | {ips(n)} ({n} px) |")
    return 0


if __name__ == "__main__":
    modes = {"--presets": presets, "--backbones": backbones}
    raise SystemExit(modes[sys.argv[1]]() if sys.argv[1:2] and sys.argv[1] in modes else main())
