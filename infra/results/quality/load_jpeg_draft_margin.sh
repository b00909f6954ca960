#!/usr/bin/env bash
# README, Decoding on the device, "0.67x as many images per second as straight to the target": bench load
# on shards of 256 JPEGs of 2048 x 1536, the build before the JPEG decode fix (116f92b: PIL's draft
# straight to the target size, checked out in a temporary git worktree) against this checkout (draft
# to twice the target size), alternated, one thread. From the repository root:
#   bash infra/results/quality/load_jpeg_draft_margin.sh SHARDS > infra/results/quality/load_jpeg_draft_margin.log
# SHARDS: a shard folder of such JPEGs (python -m msc_dist.data make-shards --from FOLDER --out SHARDS).
set -euo pipefail
[ $# -eq 1 ] && [ -d "$1" ] || { echo "usage: bash $0 SHARDS (a shard folder of 2048 x 1536 JPEGs)" >&2; exit 2; }
shards=$(cd "$1" && pwd)
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/old" 2>/dev/null; rm -rf "$tmp"' EXIT
git worktree add --detach "$tmp/old" 116f92b > /dev/null 2>&1
declare -A tree=([old]="$tmp/old" [main]="$PWD")
for size in 64 224; do for rep in 1 2; do for build in old main; do
  echo -n "$build $size rep$rep: "
  (cd "${tree[$build]}" && PYTHONPATH=. "$PY" -m msc_dist.bench load --data "$shards" --image-size $size \
    --loader-workers 1 --batch-size 64 --decode-on-device off 2>/dev/null | tail -1)
done; done; done
