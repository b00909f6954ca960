#!/usr/bin/env bash
# README, Detection quality, the two per-epoch ROC-AUC plots: `paper` and `fast`, seed 0, every epoch
# evaluated, on digit 8 and on the tiles (epoch_auc_plot_{digit8,tiles}.yaml). bench quality names a
# plot after its class (epoch_auc_ours_<class>.png); this script gives them the README's names,
# $OUT/epoch_auc_plot_digit8.png and $OUT/epoch_auc_plot_tiles.png. About 10 minutes on a 2-core CPU.
# From the repository root:
#   bash infra/results/quality/epoch_auc_plots.sh
source "$(dirname "$0")/common.sh"
plots=$(mktemp -d)
trap 'rm -rf "$plots"' EXIT
quality epoch_auc_plot_digit8 epoch_auc_plot_digit8 --plot-dir "$plots/digit8" "$@"
quality epoch_auc_plot_tiles epoch_auc_plot_tiles --plot-dir "$plots/tiles" "$@"
mv "$plots"/digit8/epoch_auc_ours_*.png "$OUT/epoch_auc_plot_digit8.png"
mv "$plots"/tiles/epoch_auc_ours_*.png "$OUT/epoch_auc_plot_tiles.png"
echo "wrote $OUT/epoch_auc_plot_digit8.png $OUT/epoch_auc_plot_tiles.png" >&2
