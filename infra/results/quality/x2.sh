#!/bin/bash
# does fine-tuning gain grow with the number of normal images (steps)? digits 2 and 9, 2048 normals, seed 0
while ! grep -q done /work/results/x1.log 2>/dev/null; do sleep 10; done
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M="--data /work/shared/datasets/mnist/mnist.npz --max-train 2048 --max-test 1000 --classes 2 9"
$PY -m msc_dist.bench quality $M --loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 --methods knn msc-fast --json-out /work/results/X_M2048.json > /dev/null 2>> /work/results/x2.log
echo done >> /work/results/x2.log
