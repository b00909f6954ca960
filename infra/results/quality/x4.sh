#!/bin/bash
while ! grep -q done /work/results/x2.log 2>/dev/null; do sleep 10; done
cd /work/exp
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/exp OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SRC_SCALE=2
C="--loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2"
M="--data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000"
$PY -m msc_dist.bench quality $M --classes 5 6 7 8 9 $C --methods msc msc-fast --json-out /work/results/Y_M_b.json > /dev/null 2>> /work/results/x4.log
$PY -m msc_dist.bench quality $M $C --resize-mode squash --methods msc-fast --json-out /work/results/Y_M_squash_fast.json > /dev/null 2>> /work/results/x4.log
echo done >> /work/results/x4.log
