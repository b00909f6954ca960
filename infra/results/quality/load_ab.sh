#!/bin/bash
# bench load on 256 JPEGs of 2048x1536, before (116f92b: draft to the target) and after (draft to 2x), alternating
PY="/work/main/.venv/bin/python"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for size in 64 224; do
for rep in 1 2; do
for tree in old main; do
  echo -n "$tree $size rep$rep: "
  (cd /work/$tree && PYTHONPATH=/work/$tree $PY -m msc_dist.bench load --data /work/bigjpg/shards --image-size $size --loader-workers 1 --batch-size 64 --decode-on-device off 2>/dev/null | tail -1)
done; done; done
