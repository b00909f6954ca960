#!/bin/bash
# training views decoded at 2x the image size (SRC_SCALE=2 patch in /work/exp), 3 seeds: MNIST msc/fast; tiles fast, squash
cd /work/exp
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/exp OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SRC_SCALE=2
C="--loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2"
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg"
M="--data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000"
$PY -m msc_dist.bench quality $M --classes 0 1 2 3 4 $C --methods msc msc-fast --json-out /work/results/Y_M_a.json > /dev/null 2>> /work/results/x3.log
$PY -m msc_dist.bench quality $T $C --methods msc-fast --json-out /work/results/Y_T_fast.json > /dev/null 2>> /work/results/x3.log
$PY -m msc_dist.bench quality $T $C --resize-mode squash --methods msc-fast --json-out /work/results/Y_T_squash_fast.json > /dev/null 2>> /work/results/x3.log
echo done >> /work/results/x3.log
