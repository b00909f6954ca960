#!/bin/bash
# after queue 1's MNIST run: knn with squashed images on every digit (3 seeds; cheap)
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
while kill -0 11142 2>/dev/null; do sleep 10; done
$PY -m msc_dist.bench quality --data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000 --loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2 --resize-mode squash --methods knn --json-out /work/results/M_squash.json > /dev/null 2>> /work/results/q1.log
echo done >> /work/results/q1.log
