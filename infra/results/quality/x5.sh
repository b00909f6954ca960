#!/bin/bash
# the per-epoch ROC-AUC plots again at the default view_source_scale 2 (seed 0, every epoch evaluated)
while ! grep -q done /work/results/x3.log 2>/dev/null; do sleep 10; done
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg"
M="--data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000"
$PY -m msc_dist.bench quality $M --classes 8 --loader-workers 0 --image-size 64 --methods msc msc-fast --plot-dir /work/results/plots2 --json-out /work/results/M8_epochs2.json > /dev/null 2>> /work/results/x5.log
$PY -m msc_dist.bench quality $T --loader-workers 0 --image-size 64 --methods msc msc-fast --plot-dir /work/results/plots2 --json-out /work/results/T_epochs2.json > /dev/null 2>> /work/results/x5.log
echo done >> /work/results/x5.log
