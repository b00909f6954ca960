"""Issue 26: does any signal from normal images alone predict whether fine-tuning helps? One
panel per signal of signals.py: for every class of every set (one point each), the signal's
change over its epoch-0 value after epoch 1 (x) against the change of the test ROC-AUC after the
last epoch (y). A usable stopping signal would put every point below zero on one side of a
vertical line. Prints the same numbers as a table. From the repository root:

    python infra/results/quality/natural/signals_plot.py infra/results/quality/natural/signals_*_1e-3.json \
        --out infra/results/quality/natural/signals.png
"""

from __future__ import annotations

import argparse
import json
import os

SIGNALS = ("normal_cos", "gap", "locality", "loo_locality", "uniformity", "eff_rank")
RELATIVE = {"gap", "locality", "loo_locality", "eff_rank"}  # ratios: the change relative to epoch 0


def change(rows: list[dict], key: str, epoch: int) -> float:
    a, b = rows[0][key], rows[epoch][key]
    return (b / a - 1) if key in RELATIVE else b - a


def points(files: list[str]) -> list[tuple[str, str, list[dict]]]:
    out = []
    for f in files:
        name = os.path.basename(f).removeprefix("signals_").split("_")[0]
        for c, rows in json.load(open(f))["classes"].items():
            out.append((name, c, rows))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    pts = [p for p in points(a.files) if len(p[2]) > 1 and all(s in p[2][0] for s in SIGNALS)]
    print("| set | class | ROC-AUC epoch 0 | after epoch 1 | last | " + " | ".join(f"{s} after 1" for s in SIGNALS) + " |")
    print("|" + "---|" * (5 + len(SIGNALS)))
    for name, c, rows in pts:
        print(f"| {name} | {c} | {rows[0]['roc_auc']:.4f} | {rows[1]['roc_auc'] - rows[0]['roc_auc']:+.4f} | "
              f"{rows[-1]['roc_auc'] - rows[0]['roc_auc']:+.4f} | "
              + " | ".join(f"{change(rows, s, 1):+.4f}" for s in SIGNALS) + " |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    colours = {"mnist": "tab:blue", "natural": "tab:red", "tiles": "tab:green"}
    for ax, s in zip(axes.flat, SIGNALS):
        for name, c, rows in pts:
            y = rows[-1]["roc_auc"] - rows[0]["roc_auc"]
            ax.scatter(change(rows, s, 1), y, color=colours.get(name, "k"), s=22)
            ax.annotate(c, (change(rows, s, 1), y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axhline(-0.005, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel(f"{s}: change after epoch 1" + (" (relative)" if s in RELATIVE else ""))
        ax.set_ylabel("ROC-AUC change, last epoch")
    for name, col in colours.items():
        axes.flat[0].scatter([], [], color=col, label=name)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Signals from normal images alone against what fine-tuning did to the ROC-AUC (lr 1e-3, seed 0)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
