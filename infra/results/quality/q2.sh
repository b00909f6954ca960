#!/bin/bash
# queue 2: the reference loop (knn, paper) on the tiles and all MNIST digits, 3 seeds; tiles squash; plots
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
C="--loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2"
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg"
M="--data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000"
$PY -m msc_dist.bench quality $T $C --loop reference --methods knn msc --json-out /work/results/T_ref.json > /dev/null 2>> /work/results/q2.log
$PY -m msc_dist.bench quality $T $C --resize-mode squash --methods knn msc-fast --json-out /work/results/T_squash.json > /dev/null 2>> /work/results/q2.log
$PY -m msc_dist.bench quality $M $C --loop reference --methods knn msc --json-out /work/results/M_ref.json > /dev/null 2>> /work/results/q2.log
# per-epoch ROC-AUC of both presets (seed 0, evaluated every epoch): one digit and the tiles
$PY -m msc_dist.bench quality $M --classes 8 --loader-workers 0 --image-size 64 --methods knn msc msc-fast --plot-dir /work/results/plots --json-out /work/results/M8_epochs.json > /dev/null 2>> /work/results/q2.log
$PY -m msc_dist.bench quality $T --loader-workers 0 --image-size 64 --methods knn msc msc-fast --plot-dir /work/results/plots --json-out /work/results/T_epochs.json > /dev/null 2>> /work/results/q2.log
echo done >> /work/results/q2.log
