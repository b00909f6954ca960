#!/bin/bash
# queue 3: the tiles again with the fixed JPEG decode (ours: knn, paper, fast; squash: knn, fast)
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
C="--loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2"
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg"
$PY -m msc_dist.bench quality $T $C --methods knn msc msc-fast --json-out /work/results/T_ours2.json > /dev/null 2>> /work/results/q3.log
$PY -m msc_dist.bench quality $T $C --resize-mode squash --methods knn msc-fast --json-out /work/results/T_squash2.json > /dev/null 2>> /work/results/q3.log
$PY -m msc_dist.bench quality $T $C --loop reference --methods knn --json-out /work/results/T_ref_knn2.json > /dev/null 2>> /work/results/q3.log
echo done >> /work/results/q3.log
