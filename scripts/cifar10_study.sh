#!/usr/bin/env bash
# The learning-quality study of docs/notebook/2026-11-cifar10-hour.md (issue 10): each method and BEiT
# ablation pretrained at one budget, each fine-tuned with the same recipes and probed, next to raw pixels and
# the same recipes from scratch; CIFAR-10, 100 labels per class, evaluated on the 10,000 test images.
#
# Usage: bash scripts/cifar10_study.sh RUNS
#   env: CIFAR   folder with train/<class>/ and test/<class>/ (default /tmp/cifar)
#        BEIT    the command (default "python -m beit")
#        SCALE   multiplies every step count (1.0: the budgets below; 0.005 for a smoke run)
#        JOBS    how many runs at once (default 2: two single-thread jobs on a 2-core CPU)
#        EXTRA   extra flags for every training command (e.g. "--device cuda --workers 3")
# Budgets at SCALE=1 (batch 64): BEiT 6,000 steps (384k images, about 7.7 epochs of the 50k; about an hour
# at ~110 images/s on a 2-core AVX-512-BF16 CPU); MAE 10,800 and iBOT 1,800 steps, the same wall clock
# on that CPU (MAE's encoder sees 25% of the patches: 1.8x BEiT's images/s; iBOT's two crops through
# student and teacher: 1/3.3). Every pretraining run has the online kNN probe on the labelled data.
set -uo pipefail
RUNS=${1:?usage: cifar10_study.sh RUNS}
CIFAR=${CIFAR:-/tmp/cifar}
BEIT=${BEIT:-python -m beit}
SCALE=${SCALE:-1.0}
JOBS=${JOBS:-2}
EXTRA=${EXTRA:-}
mkdir -p "$RUNS" "$CIFAR/ft"
ln -sfn "$CIFAR/train" "$CIFAR/ft/train"
ln -sfn "$CIFAR/test" "$CIFAR/ft/val"
steps() { python3 -c "print(max(2, round($1 * $SCALE)))"; }
log() { echo "[$(date +%H:%M:%S)] $*"; }
slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }

run() {  # NAME CMD...: run one command, its log in RUNS/NAME.log, its status in RUNS/status.txt
  local name=$1; shift
  log "start $name"
  if "$@" > "$RUNS/$name.log" 2>&1; then echo "$name ok" >> "$RUNS/status.txt"; log "done $name"
  else echo "$name FAILED" >> "$RUNS/status.txt"; log "FAILED $name: $(tail -n 2 "$RUNS/$name.log" | tr '\n' ' ')"; fi
}

finetune() {  # INIT_NAME INIT_PATH: the fine-tuning recipes and frozen probes of one initialisation
  local name=$1 init=$2
  # R1: the beit_tiny_patch4_32 fine-tuning preset (the ImageNet recipe shrunk: 100 epochs, Mixup/CutMix, RandAugment)
  slot; run "ft_r1_$name" $BEIT finetune --data "$CIFAR/ft" --init "$init" --out "$RUNS/ft_r1_$name" \
    --preset beit_tiny_patch4_32 --labels-per-class 100 --steps "$(steps 800)" $EXTRA train.eval_every=100000 &
  # R2: no Mixup/CutMix, lr 1e-3, 200 epochs
  slot; run "ft_r2_$name" $BEIT finetune --data "$CIFAR/ft" --init "$init" --out "$RUNS/ft_r2_$name" \
    --preset beit_tiny_patch4_32 --labels-per-class 100 --steps "$(steps 1600)" --lr 1e-3 $EXTRA \
    aug.mixup=0 aug.cutmix=0 train.eval_every=100000 &
  # R3: the preset's augmentation, lr 1e-3, 300 epochs (about 20 minutes on the 2-core CPU)
  slot; run "ft_r3_$name" $BEIT finetune --data "$CIFAR/ft" --init "$init" --out "$RUNS/ft_r3_$name" \
    --preset beit_tiny_patch4_32 --labels-per-class 100 --steps "$(steps 2400)" --lr 1e-3 $EXTRA \
    train.eval_every=100000 &
  if [ "$init" != none ]; then
    for p in knn linear; do
      slot; run "probe_${p}_$name" $BEIT probe $p --data "$CIFAR/ft" --init "$init" --labels-per-class 100 \
        --layers all --out "$RUNS/probe_${p}_$name.json" &
    done
  fi
}

pretrain() {  # NAME ARGS...: pretrain, then fine-tune and probe the result
  local name=$1; shift
  run "pre_$name" $BEIT pretrain --data "$CIFAR/train" --out "$RUNS/pre_$name" --probe-data "$CIFAR/ft" "$@" \
    "train.probe_every=$(steps 500)"
  [ -d "$RUNS/pre_$name/checkpoints" ] && finetune "$name" "$RUNS/pre_$name"
  wait
}

log "study in $RUNS (SCALE=$SCALE, JOBS=$JOBS, EXTRA=$EXTRA)"
# the no-learning floor and the from-scratch rows
for p in knn linear; do
  slot; run "probe_${p}_pixels" $BEIT probe $p --data "$CIFAR/ft" --init pixels --labels-per-class 100 \
    --out "$RUNS/probe_${p}_pixels.json" &
done
finetune scratch none
# methods that need no tokenizer
slot; pretrain mae --method mae --steps "$(steps 10800)" $EXTRA &
slot; pretrain ibot --method ibot --steps "$(steps 1800)" $EXTRA &
slot; pretrain beit_pixels --steps "$(steps 6000)" $EXTRA beit.target=pixels &
# the tokenizer (section 1's recipe), then BEiT and its ablations
run tok $BEIT tokenizer train --data "$CIFAR/train" --out "$RUNS/tok" --preset vq_32 --steps "$(steps 1500)" $EXTRA \
  train.eval_every=100000
TOK=(--tokenizer "$RUNS/tok")
slot; pretrain beit "${TOK[@]}" --steps "$(steps 6000)" $EXTRA &
slot; pretrain beit_mb4 "${TOK[@]}" --steps "$(steps 6000)" $EXTRA beit.min_block=4 &
slot; pretrain beit_random "${TOK[@]}" --steps "$(steps 6000)" $EXTRA beit.masking=random &
slot; pretrain beit_all "${TOK[@]}" --steps "$(steps 6000)" $EXTRA beit.predict=all &
wait
log "all done"
python3 "$(dirname "$0")/study_summary.py" "$RUNS"
