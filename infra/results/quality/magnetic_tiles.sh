#!/usr/bin/env bash
# README, Detection quality, "Magnetic tiles" (both tables and the error-removed line): our loop
# (magnetic_tiles.yaml) and the reference loop (magnetic_tiles_reference.yaml), 3 seeds, then the
# tables. About 45 minutes on a 2-core CPU. From the repository root:
#   bash infra/results/quality/magnetic_tiles.sh
source "$(dirname "$0")/common.sh"
quality magnetic_tiles magnetic_tiles "$@"
quality magnetic_tiles_reference magnetic_tiles_reference "$@"
"$PY" "$Q/tables.py" magnetic_tiles --dir "$OUT"
