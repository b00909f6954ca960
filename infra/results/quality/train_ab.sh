#!/bin/bash
# bench train: training views cut from image_size squares (view_source_scale 1) or from 2x squares (2), alternated
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for size in 64 128; do for rep in 1 2; do for s in 1 2; do
  echo -n "size $size scale $s rep$rep: "
  /work/main/.venv/bin/python -m msc_dist.bench train --image-size $size --batch-size 32 --steps 6 --warmup 2 --loader-workers 1 --view-source-scale $s 2>/dev/null | tail -1
done; done; done
