#!/bin/bash
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas
M="--data /work/shared/datasets/mnist/mnist.npz --classes 2 8 --image-size 64 --max-train 256 --max-test 1000"
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg --image-size 64"
for set in T M; do
  args="${!set} --loader-workers 0 --eval-every 0"
  $PY -m msc_dist.bench quality $args --methods msc --epochs 6 --lr 3e-3 --lr-schedule cosine --warmup-epochs 1 \
      --json-out /work/results/sweep2_${set}_cos_3e-3.json > /dev/null 2>> /work/results/sweep3.log
done
echo done >> /work/results/sweep3.log
