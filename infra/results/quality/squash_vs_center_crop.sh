#!/usr/bin/env bash
# README, Detection quality, squash against center crop: runs the squash columns
# (squash_vs_center_crop_{mnist,tiles}.yaml: frozen kNN and `fast` on squashed images) and prints the
# table; the center_crop columns are the JSON of the MNIST and tiles tables (mnist_digits.sh,
# magnetic_tiles.sh). About 30 minutes on a 2-core CPU. From the repository root:
#   bash infra/results/quality/squash_vs_center_crop.sh
source "$(dirname "$0")/common.sh"
quality squash_vs_center_crop_mnist squash_vs_center_crop_mnist "$@"
quality squash_vs_center_crop_tiles squash_vs_center_crop_tiles "$@"
"$PY" "$Q/tables.py" squash_vs_center_crop --dir "$OUT"
