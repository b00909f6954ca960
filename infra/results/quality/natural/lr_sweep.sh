#!/usr/bin/env bash
# Issue 26, choosing a `fast` that holds on natural images: 6 epochs, warm-up 1 + cosine, at a
# peak lr given as the first argument, seed 0, the test ROC-AUC and the collapse signals of every
# epoch, on the natural set's classes where `fast` (lr 1e-3) lost most (dog, bird, frog,
# automobile) and gained most (deer, ship); then the MNIST digits where it lost (6, 9) and the
# tiles at 128 px. From the repository root:
#   bash infra/results/quality/natural/lr_sweep.sh 3e-4 [natural|mnist|tiles ...]
source "$(dirname "$0")/../common.sh"
N=natural
lr=$1
shift
sets=${*:-natural mnist tiles}
sched=(--methods msc --epochs 6 --lr "$lr" --lr-schedule cosine --warmup-epochs 1 --eval-every 1 --seeds 0)
for s in $sets; do
  case $s in
    natural) quality $N/natural_64 $N/sweep_natural_$lr "${sched[@]}" --classes dog bird frog automobile deer ship ;;
    mnist) quality maps/mnist_64 $N/sweep_mnist_$lr "${sched[@]}" --classes 6 9 2 ;;
    tiles) quality maps/tiles_128 $N/sweep_tiles_$lr "${sched[@]}" ;;
    *) echo "unknown set $s; valid: natural mnist tiles" >&2; exit 2 ;;
  esac
done
