#!/bin/bash
# session 2026-11-29 evening: MNIST msc `fast` with squashed images (the missing squash cell), 3 seeds
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M="--data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000"
$PY -m msc_dist.bench quality $M --loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2 --resize-mode squash --methods msc-fast --json-out /work/results/M_squash_fast.json > /dev/null 2>> /work/results/q4.log
echo done >> /work/results/q4.log
