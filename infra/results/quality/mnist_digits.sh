#!/usr/bin/env bash
# README, Detection quality, "MNIST, every digit" (both tables and the error-removed line): our loop
# (mnist_digits.yaml) and the reference loop (mnist_digits_reference.yaml), 10 digits x 3 seeds, then
# the tables. About 3 hours on a 2-core CPU. From the repository root:
#   bash infra/results/quality/mnist_digits.sh
source "$(dirname "$0")/common.sh"
quality mnist_digits mnist_digits "$@"
quality mnist_digits_reference mnist_digits_reference "$@"
"$PY" "$Q/tables.py" mnist_digits --dir "$OUT"
