#!/usr/bin/env bash
# README, "Anomaly maps": the magnetic-tile table (global kNN, global MSC, patch frozen, patch on
# the MSC trunk, combined; image and pixel ROC-AUC, PRO, bank size, wall times; 3 seeds at 128 and
# 224 px) and the MNIST rows (image level, every digit, 64 px). About 35 minutes at 128 px, 2 hours
# at 224 px and 15 minutes for MNIST on a quiet 2-core CPU. From the repository root:
#   bash infra/results/quality/maps/maps.sh                 # all of it
#   bash infra/results/quality/maps/maps.sh tiles_128 mnist_64   # some of it
source "$(dirname "$0")/../common.sh"
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(tiles_128 tiles_224 mnist_64)
for r in "${runs[@]}"; do
  quality "maps/$r" "maps/methods_$r"
done
"$PY" "$Q/tables.py" maps --dir "$OUT"
