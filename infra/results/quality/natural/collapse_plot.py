"""Issue 26's per-epoch plot: the anomaly-free collapse signal (the rise of ``normal_cos``, the mean
pairwise cosine of the normal training images' features, over its epoch-0 value; the training
loop's ``collapse_rise`` alarm) against the test ROC-AUC, for runs of ``bench quality
--eval-every 1``. Run from the repository root:

    python infra/results/quality/natural/collapse_plot.py \\
        --run "natural, dog (bad)" infra/results/quality/natural/lite0_fast_dog.json dog msc-fast \\
        --run "tiles 128 px (good)" infra/results/quality/natural/tiles128_fast_epochs.json MT_Free msc-fast \\
        --run "MNIST digit 8, 64 px" infra/results/quality/natural/digit8_fast_epochs.json 8 msc-fast \\
        --out infra/results/quality/natural/collapse_signal.png

Each --run: LABEL FILE CLASS METHOD; every seed of the run is one line. The dashed line is the
alarm's threshold (``--collapse-rise``, the `fast` preset's 0.17)."""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs=4, action="append", metavar=("LABEL", "FILE", "CLASS", "METHOD"), required=True)
    ap.add_argument("--collapse-rise", type=float, default=0.17)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    fig, axes = plt.subplots(2, len(a.run), figsize=(5 * len(a.run), 6), sharex="col", squeeze=False)
    for col, (label, path, cls, method) in enumerate(a.run):
        with open(path) as f:
            seeds = json.load(f)["classes"][cls][method]["seeds"]
        auc_ax, sig_ax = axes[0][col], axes[1][col]
        for i, s in enumerate(seeds):
            ep = s["epochs"]
            x = [e["epoch"] for e in ep]
            start = ep[0]["normal_cos"]
            auc_ax.plot(x, [e.get("roc_auc") for e in ep], marker="o", label=f"seed {i}")
            sig_ax.plot(x, [e["normal_cos"] - start for e in ep], marker="o", label=f"seed {i}")
            # where the alarm at --collapse-rise fires: the first such epoch stops an on_collapse stop run
            flagged = [e for e in ep if e["epoch"] > 0 and e["normal_cos"] - start >= a.collapse_rise]
            if flagged:
                sig_ax.scatter([flagged[0]["epoch"]], [flagged[0]["normal_cos"] - start], s=90, facecolors="none",
                               edgecolors="red", zorder=3)
        sig_ax.axhline(a.collapse_rise, ls="--", c="red", lw=1, label=f"collapse_rise {a.collapse_rise}")
        auc_ax.set_title(label)
        auc_ax.set_ylabel("test ROC-AUC")
        sig_ax.set_ylabel("normal_cos - epoch 0's")
        sig_ax.set_xlabel("epoch (0 = frozen)")
        auc_ax.grid(alpha=0.3)
        sig_ax.grid(alpha=0.3)
        auc_ax.legend(fontsize=8)
        sig_ax.legend(fontsize=8)
    fig.suptitle("Collapse signal vs test ROC-AUC per epoch (red circle: where the alarm stops the run; "
                 "it keeps the epoch before)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
