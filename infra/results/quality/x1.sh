#!/bin/bash
cd /work/exp
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/exp OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
C="--loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2"
T="--data /work/shared/datasets/magnetic-tile --classes MT_Free --exts jpg"
SRC_SCALE=2 $PY -m msc_dist.bench quality $T $C --methods msc --json-out /work/results/X_T_src2.json > /dev/null 2>> /work/results/x1.log
echo done >> /work/results/x1.log
