#!/usr/bin/env bash
# README, Detection quality, training views from the image_size square (scale 1) against the image
# decoded at twice that side (scale 2): runs the scale-1 columns (view_source_scale_1_{mnist,tiles}.yaml)
# and prints the table; the scale-2 and reference columns are the JSON of the MNIST and tiles tables
# (mnist_digits.sh, magnetic_tiles.sh). About 2 hours on a 2-core CPU. From the repository root:
#   bash infra/results/quality/view_source_scale.sh
source "$(dirname "$0")/common.sh"
# MNIST's `fast` goes to its own file (view_source_scale_1_mnist_fast.json: rerun under the collapse
# rule, 2026-12-04; tables.py takes `fast` from it); the main file's msc-fast is the run before the rule
quality view_source_scale_1_mnist view_source_scale_1_mnist --methods knn msc "$@"
quality view_source_scale_1_mnist view_source_scale_1_mnist_fast --methods msc-fast "$@"
quality view_source_scale_1_tiles view_source_scale_1_tiles "$@"
"$PY" "$Q/tables.py" view_source_scale --dir "$OUT"
