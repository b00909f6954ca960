#!/bin/bash
# when queue 3 is done: digits 7-9 of MNIST ours in a second process; queue 1 stops after digit 6
cd /work/meas
PY="/work/main/.venv/bin/python"
export PYTHONPATH=/work/meas OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
while pgrep -f q3.sh > /dev/null; do sleep 10; done
$PY -m msc_dist.bench quality --data /work/shared/datasets/mnist/mnist.npz --max-train 256 --max-test 1000 --loader-workers 0 --eval-every 0 --image-size 64 --seeds 0 1 2 --methods knn msc msc-fast --classes 7 8 9 --json-out /work/results/M_ours_b.json > /dev/null 2>> /work/results/split.log &
while kill -0 11142 2>/dev/null; do
  n=$(python3 -c "import json; print(len(json.load(open('/work/results/M_ours.json'))['classes']))" 2>/dev/null || echo 0)
  if [ "$n" -ge 7 ]; then kill 11142; echo "stopped queue 1 after $n digits" >> /work/results/split.log; fi
  sleep 5
done
wait
echo done >> /work/results/split.log
