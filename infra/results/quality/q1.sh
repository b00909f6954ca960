#!/bin/bash
# queue 1: ours (knn, paper, fast) on the tiles and all MNIST digits, 3 seeds; MNIST squash
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
C="--loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2"
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg"
M="--data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000"
$PY -m msc_dist.bench quality $T $C --methods knn msc msc-fast --json-out /work/results/T_ours.json > /dev/null 2>> /work/results/q1.log
$PY -m msc_dist.bench quality $M $C --methods knn msc msc-fast --json-out /work/results/M_ours.json > /dev/null 2>> /work/results/q1.log
$PY -m msc_dist.bench quality $M --loader-workers 0 --eval-every 0 --image-size 64 --resize-mode squash --methods knn msc-fast --json-out /work/results/M_squash.json > /dev/null 2>> /work/results/q1.log
echo done >> /work/results/q1.log
