#!/bin/bash
# fast-preset sweep at 64 px: paper (20 epochs, lr 1e-5) vs 6 epochs warm-up 1 + cosine, lr 1e-4 / 3e-4
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas
M="--data /work/shared/datasets/mnist/mnist.npz --classes 2 8 --image-size 64 --max-train 256 --max-test 1000"
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg --image-size 64"
for set in T M; do
  args="${!set} --loader-workers 0 --eval-every 0"
  $PY -m msc_dist.bench quality $args --methods knn msc --json-out /work/results/sweep2_${set}_paper.json > /dev/null 2>> /work/results/sweep2.log
  for lr in 1e-4 3e-4; do
    $PY -m msc_dist.bench quality $args --methods msc --epochs 6 --lr $lr --lr-schedule cosine --warmup-epochs 1 \
      --json-out /work/results/sweep2_${set}_cos_$lr.json > /dev/null 2>> /work/results/sweep2.log
  done
done
echo done >> /work/results/sweep2.log
