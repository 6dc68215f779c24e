#!/usr/bin/env bash
# The CIFAR-10 experiments of docs/notebook/2026-11-cifar10-*.md, sections 1-4, in order. Each step is one
# documented command; the budgets are the ones reported there. Usage: bash scripts/cifar10_results.sh STEP   (or `all`)
# Data: ../shared/data/cifar10-png.tar.gz extracted to $CIFAR (train/<class>/, test/<class>/).
set -euo pipefail
CIFAR=${CIFAR:-/tmp/cifar}
RUNS=${RUNS:-runs/cifar10}
BEIT=${BEIT:-.venv/bin/beit}
mkdir -p "$RUNS" "$CIFAR/ft"
ln -sfn "$CIFAR/train" "$CIFAR/ft/train"   # fine-tuning layout: train/ and val/ (= the test split)
ln -sfn "$CIFAR/test" "$CIFAR/ft/val"

step() {
  case "$1" in
  tokenizer)   # issue 3: 32 px tokenizer, 8x8 ids, at most 20 minutes
    $BEIT tokenizer train --data "$CIFAR/train" --val-data "$CIFAR/test" --out "$RUNS/tok32_vq" --preset vq_32 \
      --steps 1500 --max-minutes 20 train.log_every=25 train.ckpt_every=250 \
      train.eval_every=750 ;;
  beit)        # issue 4: BEiT pretraining of beit_tiny_patch4_32, about 30 minutes
    $BEIT pretrain --data "$CIFAR/train" --tokenizer "$RUNS/tok32_vq" --out "$RUNS/beit" --preset beit_tiny_patch4_32 \
      --steps "${BEIT_STEPS:-2700}" --max-minutes 32 train.log_every=10 train.ckpt_every=100 ;;
  compare)     # issue 7: same short budget for the three methods
    for m in beit mae ibot; do
      extra=(); [ "$m" = beit ] && extra=(--tokenizer "$RUNS/tok32_vq")
      $BEIT pretrain --method "$m" --data "$CIFAR/train" "${extra[@]}" --out "$RUNS/cmp_$m" \
        --steps "${CMP_STEPS:-300}" train.log_every=10 train.ckpt_every=100
    done ;;
  finetune)    # issues 5 and 7: 1,000 labels (100 per class), same recipe and budget for every init
    for init in beit:"$RUNS/beit" scratch:none cmp_beit:"$RUNS/cmp_beit" cmp_mae:"$RUNS/cmp_mae" cmp_ibot:"$RUNS/cmp_ibot"; do
      name=${init%%:*}; path=${init#*:}
      $BEIT finetune --data "$CIFAR/ft" --init "$path" --out "$RUNS/ft_$name" --preset beit_tiny_patch4_32 \
        --labels-per-class 100 --epochs "${FT_EPOCHS:-15}" --precision bf16 train.eval_every=100000
    done ;;
  probe)       # frozen features, 1,000 labels, evaluated on the 10,000 test images
    for name in beit cmp_beit cmp_mae cmp_ibot; do
      $BEIT probe knn --data "$CIFAR/ft" --init "$RUNS/$name" --labels-per-class 100 --layers -1 --out "$RUNS/knn_$name.json"
      $BEIT probe linear --data "$CIFAR/ft" --init "$RUNS/$name" --labels-per-class 100 --layers -1 --out "$RUNS/linear_$name.json"
    done ;;
  *) echo "unknown step $1"; exit 2 ;;
  esac
}

if [ "${1:-all}" = all ]; then for s in tokenizer beit compare finetune probe; do step "$s"; done; else step "$1"; fi
