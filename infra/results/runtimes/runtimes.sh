#!/usr/bin/env bash
# README, "CPU inference runtimes": each runtime's images/s through `bench embed` (the path from
# shards, and the model alone), through the embedding job itself (`--job`: msc embed on the same
# images) and through serving with 8 images per request (`bench serve --runtime`, against the
# offline embedding it measures beside), at 224 and 64 px, the runtimes alternated in each round.
# About 25 minutes on a quiet 2-core CPU. From the repository root:
#   bash infra/results/runtimes/runtimes.sh
# OUT=DIR writes the JSON lines there instead of over the committed ones; PYTHON=... the interpreter.
set -euo pipefail
if [ ! -d msc_dist ] || [ ! -f infra/results/runtimes/runtimes.sh ]; then
  echo "run from the repository root: bash infra/results/runtimes/runtimes.sh" >&2
  exit 2
fi
OUT=${OUT:-infra/results/runtimes}
PY=${PYTHON:-python}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export MSC_RUNTIME_CACHE="$W/cache"  # every graph built once here and reused by the jobs and replicas
mkdir -p "$OUT"
RUNTIMES=(torch onnxruntime openvino)

for size in 224 64; do
  images=$([ "$size" = 224 ] && echo 1024 || echo 2048)
  "$PY" -m msc_dist.bench embed --device cpu --image-size "$size" --batch-size 32 --images "$images" \
    --runtime "${RUNTIMES[@]}" --rounds 2 --job > "$OUT/embed_${size}px.jsonl"
done

# Serving at 224 px: the frozen model (epoch 0) of a demo set, its index, one bench serve per runtime.
"$PY" -m msc_dist data demo --out "$W/demo" --size 224 --n-train 512 --n-test-normal 0 --n-test-defect 0 > /dev/null
"$PY" -m msc_dist train --data "$W/demo/train" --epochs 0 --image-size 224 --storage-path "$W/runs" --name frozen > /dev/null
"$PY" -m msc_dist embed --checkpoint "$W/runs/frozen" --out "$W/index" > /dev/null
: > "$OUT/serve_224px.jsonl"
for r in "${RUNTIMES[@]}"; do
  "$PY" -m msc_dist.bench serve --checkpoint "$W/runs/frozen" --index "$W/index" --runtime "$r" --device cpu \
    --concurrency 1 8 --seconds 8 | grep "^{" >> "$OUT/serve_224px.jsonl"
done
"$PY" infra/results/runtimes/table.py --dir "$OUT"
