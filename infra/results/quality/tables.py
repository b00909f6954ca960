"""Print one of the README's "Detection quality" tables (Markdown) from the `bench quality` JSON
results in this folder. Run from the repository root:

    python infra/results/quality/tables.py TABLE [--dir DIR]

TABLE: fast_sweep | mnist_digits | magnetic_tiles | view_source_scale | squash_vs_center_crop | maps |
maps_split | maps_scale.
Each result file NAME.json is read from DIR (default: this folder) or, when DIR lacks it, from
this folder (a line on stderr says so): a table script run with OUT=DIR writes its own runs there
and still finds the other tables' committed runs. Means over classes use the classes that every
file of a row has."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP_LRS = ("1e-4", "3e-4", "1e-3", "3e-3")


class Results:
    """The JSON files of one table: DIR first, then this folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def has(self, name: str) -> bool:
        return any(os.path.exists(os.path.join(d, name + ".json")) for d in (self.folder, HERE))

    def __call__(self, name: str) -> dict:
        path = os.path.join(self.folder, name + ".json")
        if not os.path.exists(path):
            path = os.path.join(HERE, name + ".json")
            if os.path.abspath(self.folder) != HERE:
                print(f"{name}.json: not in {self.folder}; using the committed one", file=sys.stderr)
        if not os.path.exists(path):
            raise SystemExit(f"{name}.json: no such result in {self.folder} or {HERE}")
        with open(path) as f:
            return json.load(f)


def common(*results: dict) -> list[str]:
    """The classes every result has, in the first one's order."""
    return [c for c in results[0]["classes"] if all(c in r["classes"] for r in results[1:])]


def mean(res: dict, method: str, classes: list[str], key: str = "roc_auc") -> float:
    return float(np.mean([res["classes"][c][method][key] for c in classes]))


def mean_sd(res: dict, method: str, classes: list[str]) -> str:
    """The class-mean ROC-AUC and its standard deviation over seeds."""
    n = min(len(res["classes"][c][method]["seeds"]) for c in classes)
    by_seed = [np.mean([res["classes"][c][method]["seeds"][i]["roc_auc"] for c in classes]) for i in range(n)]
    return f"{np.mean(by_seed):.4f} ± {np.std(by_seed):.4f}"


def cell(x: dict | None, key: str = "roc_auc", sd: bool = True) -> str:
    if x is None:
        return ""
    s = f"{x[key]:.4f}"
    if sd and key + "_std" in x:
        s += f" ± {x[key + '_std']:.4f}"
    return s


def per_class(ours: dict, ref: dict, label: str) -> str:
    """ROC-AUC of knn / paper / fast (ours) beside the reference loop's knn / paper, then AP and
    wall times, then the share of the frozen kNN's error that fine-tuning removes."""
    rows = common(ours, ref)
    out = [f"| {label} | knn | msc `paper` | msc `fast` | reference loop, knn | reference loop, msc `paper` "
           "| ours − reference (`paper`) |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        o, r = ours["classes"][c], ref["classes"][c]
        out.append(f"| {c} | {cell(o['knn'])} | {cell(o['msc'])} | {cell(o['msc-fast'])} | {cell(r['knn'])} | "
                   f"{cell(r['msc'])} | {o['msc']['roc_auc'] - r['msc']['roc_auc']:+.4f} |")
    out.append(f"| **mean** | {mean_sd(ours, 'knn', rows)} | {mean_sd(ours, 'msc', rows)} | "
               f"**{mean_sd(ours, 'msc-fast', rows)}** | {mean_sd(ref, 'knn', rows)} | {mean_sd(ref, 'msc', rows)} | "
               f"{mean(ours, 'msc', rows) - mean(ref, 'msc', rows):+.4f} |")
    out += ["", f"| {label} | AP knn | AP `paper` | AP `fast` | seconds knn | seconds `paper` | seconds `fast` "
                "| `fast` / `paper` time |", "|---|---|---|---|---|---|---|---|"]
    ap = "average_precision"
    for c in rows:
        o = ours["classes"][c]
        out.append(f"| {c} | {cell(o['knn'], ap, False)} | {cell(o['msc'], ap, False)} | "
                   f"{cell(o['msc-fast'], ap, False)} | {o['knn']['seconds']:.0f} | {o['msc']['seconds']:.0f} | "
                   f"{o['msc-fast']['seconds']:.0f} | {o['msc-fast']['train_seconds'] / o['msc']['train_seconds']:.2f} |")
    m = {k: {meth: mean(ours, meth, rows, k) for meth in ("knn", "msc", "msc-fast")}
         for k in (ap, "seconds", "roc_auc")}
    m["train_seconds"] = {meth: mean(ours, meth, rows, "train_seconds") for meth in ("msc", "msc-fast")}
    out.append(f"| **mean** | {m[ap]['knn']:.4f} | {m[ap]['msc']:.4f} | {m[ap]['msc-fast']:.4f} | "
               f"{m['seconds']['knn']:.0f} | {m['seconds']['msc']:.0f} | {m['seconds']['msc-fast']:.0f} | "
               f"{m['train_seconds']['msc-fast'] / m['train_seconds']['msc']:.2f} |")
    k, p, f = (m["roc_auc"][meth] for meth in ("knn", "msc", "msc-fast"))
    out += ["", f"Error removed (1 − ROC-AUC, relative to frozen kNN): `paper` {100 * (p - k) / (1 - k):.0f} %, "
                f"`fast` {100 * (f - k) / (1 - k):.0f} %."]
    return "\n".join(out)


def fast_sweep(R: Results) -> str:
    """The sweep that chose the fast preset: seed 0, tiles and digits 2 and 8."""
    rows = [("frozen kNN", "paper", "knn"), ("`paper`: lr 1e-5, constant", "paper", "msc")]
    rows += [(f"warm-up 1 + cosine, lr {lr}" + (" (`fast`)" if lr == "1e-3" else ""), f"cos_{lr}", "msc")
             for lr in SWEEP_LRS]
    table = []
    for label, run, method in rows:
        t, m = R(f"fast_sweep_tiles_{run}"), R(f"fast_sweep_mnist_{run}")
        tile = t["classes"]["MT_Free"][method]
        digits = [m["classes"][c][method] for c in ("2", "8")]
        train_s = [x.get("train_seconds", 0.0) for x in (tile, *digits)]
        epochs = 0 if method == "knn" else t["config"]["epochs"]
        table.append([label, str(epochs), tile["roc_auc"], digits[0]["roc_auc"], digits[1]["roc_auc"],
                      "0" if method == "knn" else f"{train_s[0]:.0f} / {np.mean(train_s[1:]):.0f}"])
    for col in (2, 3, 4):  # the best of each ROC-AUC column in bold
        best = max(r[col] for r in table)
        for r in table:
            r[col] = f"**{r[col]:.4f}**" if r[col] == best else f"{r[col]:.4f}"
    out = ["| setting | epochs | tiles ROC-AUC | digit 2 | digit 8 | training seconds, tiles / one digit |",
           "|---|---|---|---|---|---|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in table])


def view_source_scale(R: Results) -> str:
    out = ["| data | `paper`, scale 1 | `paper`, scale 2 | reference loop, `paper` | `fast`, scale 1 | `fast`, scale 2 |",
           "|---|---|---|---|---|---|"]
    for label, one, two, ref in (("MNIST, mean of {n} digits", "view_source_scale_1_mnist", "mnist_digits",
                                  "mnist_digits_reference"),
                                 ("magnetic tiles", "view_source_scale_1_tiles", "magnetic_tiles",
                                  "magnetic_tiles_reference")):
        a, b, r = R(one), R(two), R(ref)
        # <one>_fast: `fast` at scale 1 rerun alone (under its collapse rule), where it was
        af = R(one + "_fast") if R.has(one + "_fast") else a
        cs = common(a, b, r, af)
        out.append(f"| {label.format(n=len(cs))} | {mean(a, 'msc', cs):.4f} | {mean(b, 'msc', cs):.4f} | "
                   f"{mean(r, 'msc', cs):.4f} | {mean(af, 'msc-fast', cs):.4f} | {mean(b, 'msc-fast', cs):.4f} |")
    return "\n".join(out)


def squash_vs_center_crop(R: Results) -> str:
    out = ["| data | knn, center_crop | knn, squash | msc `fast`, center_crop | msc `fast`, squash |",
           "|---|---|---|---|---|"]
    for label, crop, squash in (("MNIST, {n} digits", "mnist_digits", "squash_vs_center_crop_mnist"),
                                ("magnetic tiles", "magnetic_tiles", "squash_vs_center_crop_tiles")):
        cc, sq = R(crop), R(squash)
        cs = common(cc, sq)
        seeds = ", ".join(str(s) for s in sq["seeds"])
        out.append(f"| {label.format(n=len(cs))} (seeds {seeds}) | {mean(cc, 'knn', cs):.4f} | {mean(sq, 'knn', cs):.4f} | "
                   f"{mean(cc, 'msc-fast', cs):.4f} | {mean(sq, 'msc-fast', cs):.4f} |")
    return "\n".join(out)


MAP_ROWS = (("global kNN, frozen", "knn"), ("global MSC (`fast`)", "msc-fast"), ("patch, frozen trunk", "patch"),
            ("patch, MSC (`fast`) trunk", "msc-patch"))
PATCH_ROWS = ("patch", "msc-patch")


def _features(r: dict) -> str:
    """A patch row's features, from the PatchSpec it recorded (no ``norm``: raw, as before it existed)."""
    spec = r.get("patch") or (r.get("seeds") or [{}])[0].get("patch")
    if not spec:
        return ""
    return f" (blocks {'+'.join(str(x) for x in spec['stages'])}, {spec.get('norm', 'none').replace('none', 'raw')})"


def maps(R: Results) -> str:
    """maps/methods_<run>.json, each run there is: the magnetic tiles at 128 and 224 px (image
    ROC-AUC of each method, the combined score of each patch method, pixel ROC-AUC and PRO, bank
    bytes per image, seconds per seed) and MNIST (the mean over its digits; image level).
    maps/methods_<run>_msc.json (the trained methods, where they ran apart from the others) adds
    the methods the main file lacks; maps/methods_<run>_blocks34.json (the first patch features,
    blocks 3 + 4 raw) adds its patch rows after all others (the before / after). Each group is in
    MAP_ROWS order, so every size lists its methods alike."""
    from msc_dist.backbones import get_spec  # run from the repository root

    out = ["| data | px | method | image ROC-AUC | combined | pixel ROC-AUC | PRO (30 % FPR) | bank / image | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for run, label in (("tiles_128", "magnetic tiles"), ("tiles_224", "magnetic tiles"),
                       ("mnist_64", "MNIST, mean of {n} digits")):
        shown: set[str] = set()
        rows: list[tuple[bool, int, str]] = []  # (blocks34 last, MAP_ROWS order, row): one order at every size
        # _msc: the trained methods where they ran apart (seed by seed, merged with merge_seeds.py)
        for name in (f"maps/methods_{run}", f"maps/methods_{run}_msc", f"maps/methods_{run}_blocks34"):
            if not R.has(name):
                print(f"{name}.json: not run yet; its rows are left out", file=sys.stderr)
                continue
            res = R(name)
            dim = get_spec(res["config"]["backbone"]).dim
            classes = list(res["classes"])
            seeds = ", ".join(str(x) for x in res["seeds"])
            for order, (text, m) in enumerate(MAP_ROWS):
                first = res["classes"][classes[0]].get(m)
                if first is None or (m in shown and m not in PATCH_ROWS):
                    continue
                shown.add(m)
                x = first if len(classes) == 1 else {
                    k: mean(res, m, classes, k) for k in ("roc_auc", "combined_roc_auc", "seconds", "bank_bytes_per_image")
                    if all(k in res["classes"][c][m] for c in classes)}
                per = x.get("bank_bytes_per_image") or 4 * dim  # global: one float32 vector
                bank = f"{per / 1024:.0f} KiB" if per >= 1024 else f"{per:.0f} B"

                def c(key, x=x, sd=len(res["seeds"]) > 1):
                    return cell(x, key, sd) if key in x else ""

                rows.append((name.endswith("_blocks34"), order,
                             f"| {label.format(n=len(classes))} (seeds {seeds}) | {res['config']['image_size']} | "
                             f"{text}{_features(first)} | {c('roc_auc')} | {c('combined_roc_auc')} | "
                             f"{c('pixel_roc_auc')} | {c('pro')} | {bank} | {x['seconds']:.0f} |"))
        out += [row for *_, row in sorted(rows)]
    return "\n".join(out)


def maps_split(R: Results) -> str:
    """The magnetic tiles split by image (maps/methods_tiles_<px>[_msc].json, make-shards' seeded split)
    against split by physical tile (maps/bytile_tiles_<px>[_msc].json, ``--groups tile_groups.json``):
    each method's image ROC-AUC, and the patch method's pixel ROC-AUC and PRO, mean ± std over
    the seeds of the by-tile file."""
    out = ["| px | method | image ROC-AUC, split by image | split by tile | pixel ROC-AUC, by image | by tile | "
           "PRO, by image | by tile |", "|---|---|---|---|---|---|---|---|"]
    for px in (128, 224):
        if not R.has(f"maps/bytile_tiles_{px}"):
            print(f"maps/bytile_tiles_{px}.json: not run yet; its rows are left out", file=sys.stderr)
            continue
        tile = [R(n) for n in (f"maps/bytile_tiles_{px}", f"maps/bytile_tiles_{px}_msc") if R.has(n)]
        img = [R(n) for n in (f"maps/methods_tiles_{px}", f"maps/methods_tiles_{px}_msc") if R.has(n)]
        for text, m in MAP_ROWS:
            t = next((r["classes"]["MT_Free"][m] for r in tile if m in r["classes"]["MT_Free"]), None)
            if t is None:
                continue
            i = next((r["classes"]["MT_Free"][m] for r in img if m in r["classes"]["MT_Free"]), {})
            cells = [f"{cell(x, k)}" if k in x else "" for k in ("roc_auc", "pixel_roc_auc", "pro") for x in (i, t)]
            out.append(f"| {px} | {text} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def maps_scale(R: Results) -> str:
    """maps/scale_tiles_*.json (tiles_scale.py): squash against one pixel scale for every tile, frozen
    Lite0, split by image and by tile; the seed draws the split (by tile), the hold-out and the coreset."""
    out = ["| resize | split (seed) | pixels / tile (median) | global kNN | patch: image ROC-AUC | pixel ROC-AUC (224 x 224 grid) "
           "| pixel ROC-AUC (own pixels) | normal test tiles: median map | defect-free pixels of defective tiles over "
           "the median Uneven defect pixel |", "|---|---|---|---|---|---|---|---|---|"]
    names = sorted((f[:-5] for f in set(os.listdir(os.path.join(HERE, "maps"))) | set(
        os.listdir(os.path.join(R.folder, "maps")) if os.path.isdir(os.path.join(R.folder, "maps")) else [])
        if f.startswith("scale_tiles_") and f.endswith(".json")))
    rows = []
    for n in names:
        d = R(f"maps/{n}")
        r, surf = d["results"], d["results"]["surface"]["classes"]
        defect = [v["defect_free_pixels_above_uneven_median"] for k, v in surf.items() if k != "MT_Free"]
        by_tile = d.get("split_by", "image") != "image"
        seed = d["patch"]["seed"]
        rows.append(((by_tile, d["mode"] != "squash 224", d["mode"], seed),
                     f"| {d['mode']} | {'tile' if by_tile else 'image'} ({seed}) | {d['median_pixels_per_tile']:,} | "
                     f"{r['global_image_roc_auc']:.4f} | {r['patch_image_roc_auc']:.4f} | {r['pixel_roc_auc']:.4f} | "
                     f"{r['pixel_roc_auc_own_pixels']:.4f} | {surf['MT_Free']['image_median_p10_p50_p90'][1]:.3f} | "
                     f"{min(defect):.2f}-{max(defect):.2f} (normal tiles {surf['MT_Free']['defect_free_pixels_above_uneven_median']:.3f}) |"))
    return "\n".join(out + [row for _, row in sorted(rows)])


TABLES = {
    "maps": maps,
    "maps_split": maps_split,
    "maps_scale": maps_scale,
    "fast_sweep": fast_sweep,
    "mnist_digits": lambda R: per_class(R("mnist_digits"), R("mnist_digits_reference"), "digit"),
    "magnetic_tiles": lambda R: per_class(R("magnetic_tiles"), R("magnetic_tiles_reference"), "normal class"),
    "view_source_scale": view_source_scale,
    "squash_vs_center_crop": squash_vs_center_crop,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print a README Detection quality table from the JSON results.")
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--dir", default=HERE, help="where the JSON results are (default: this folder)")
    a = p.parse_args(argv)
    print(TABLES[a.table](Results(a.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
