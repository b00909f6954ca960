#!/usr/bin/env bash
# README, Detection quality, "How `fast` was chosen": on the tiles and on digits 2 and 8 (seed 0,
# fast_sweep_{tiles,mnist}.yaml), the frozen kNN and `paper`, then 6 epochs of warm-up 1 + cosine at
# four peak learning rates; then the table. About 15 minutes on an idle 2-core CPU. From the
# repository root:
#   bash infra/results/quality/fast_sweep.sh
# the sweep ran alone, with torch's default threads (every core)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$(nproc)}
source "$(dirname "$0")/common.sh"
for set in tiles mnist; do
  quality fast_sweep_$set fast_sweep_${set}_paper --methods knn msc "$@"
  for lr in 1e-4 3e-4 1e-3 3e-3; do
    quality fast_sweep_$set fast_sweep_${set}_cos_$lr --methods msc --epochs 6 --lr $lr --lr-schedule cosine \
      --warmup-epochs 1 "$@"
  done
done
"$PY" "$Q/tables.py" fast_sweep --dir "$OUT"
