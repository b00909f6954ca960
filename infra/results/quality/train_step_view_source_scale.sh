#!/usr/bin/env bash
# README, Detection quality, "the larger decode costs the training step nothing measurable": bench train
# with training views cut from image_size squares (--view-source-scale 1) or from 2x squares (2),
# alternated, at 64 and 128 px, one thread. From the repository root:
#   bash infra/results/quality/train_step_view_source_scale.sh > infra/results/quality/train_step_view_source_scale.log
set -euo pipefail
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for size in 64 128; do for rep in 1 2; do for s in 1 2; do
  echo -n "size $size scale $s rep$rep: "
  "$PY" -m msc_dist.bench train --image-size $size --batch-size 32 --steps 6 --warmup 2 --loader-workers 1 \
    --view-source-scale $s 2>/dev/null | tail -1
done; done; done
