#!/usr/bin/env bash
# Issue 26: embedding images/s of EfficientNet-Lite0/1/2 on this CPU (one thread, random weights:
# the speed does not depend on them), at 64 and 128 px and at each one's native size (224 / 240 /
# 260), the three alternated in two rounds so that a change of load hits all of them. One JSON line
# per run, the backbone and size added. From the repository root:
#   bash infra/results/quality/natural/backbone_speed.sh > infra/results/quality/natural/backbone_speed.log
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
PY=${PYTHON:-python}
native() { case $1 in efficientnet_lite0) echo 224 ;; efficientnet_lite1) echo 240 ;; efficientnet_lite2) echo 260 ;; esac; }
for round in 1 2; do
  for size in 64 128 native; do
    for b in efficientnet_lite0 efficientnet_lite1 efficientnet_lite2; do
      s=$size; [ "$s" = native ] && s=$(native $b)
      n=$(( s > 128 ? 256 : 1024 ))
      "$PY" -m msc_dist.bench embed --backbone "$b" --image-size "$s" --images "$n" --random-init --device cpu \
        --batch-size 64 2>/dev/null | tail -1 | "$PY" -c "import json, sys; d = json.loads(sys.stdin.read()); \
print(json.dumps({'round': $round, 'backbone': '$b', 'image_size': $s, 'images': d['images'], \
'images_per_s': round(d['images_per_s'], 1), 'model_images_per_s': round(d['model_images_per_s'], 1)}))"
    done
  done
done
