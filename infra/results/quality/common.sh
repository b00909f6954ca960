# Sourced by the table scripts in this folder, not run by itself. Environment:
#   OUT=DIR     write the JSON results (and plots) to DIR instead of over the committed files here
#   PYTHON=...  the interpreter (default: python)
#   OMP_NUM_THREADS, MKL_NUM_THREADS: default 1
# Each script's own arguments are added to every one of its bench quality runs (flags win over the
# YAML file), e.g. a cut-down check that runs in minutes:
#   OUT=$(mktemp -d) bash infra/results/quality/<table>.sh --seeds 0 --epochs 1 --time-budget 1 --batch-size 16
# (--time-budget 1: the first class only; --max-train / --max-test: npz data only, so mnist_digits.sh alone)
set -euo pipefail
Q=infra/results/quality
if [ ! -f "$Q/tables.py" ] || [ ! -d msc_dist ]; then
  echo "run from the repository root: bash $Q/$(basename "$0")" >&2
  exit 2
fi
OUT=${OUT:-$Q}
PY=${PYTHON:-python}
# one thread per process unless set, as the committed runs had (two or three shared the two cores)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"

# quality CONFIG RESULT [FLAG...]: bench quality with $Q/CONFIG.yaml and the flags -> $OUT/RESULT.json
quality() {
  local config=$1 result=$2
  shift 2
  echo "bench quality --config $Q/$config.yaml $* -> $OUT/$result.json" >&2
  "$PY" -m msc_dist.bench quality --config "$Q/$config.yaml" "$@" --json-out "$OUT/$result.json" > /dev/null
}
