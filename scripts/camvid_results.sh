#!/usr/bin/env bash
# The CamVid segmentation experiment of docs/results.md (issue 14), in order. Usage:
#   bash scripts/camvid_results.sh STEP     STEP: data baseline tokenizer pretrain cifar segment table (or `all`)
# Budgets (2 CPU cores): <= 60 min of pretraining per backbone (BEiT: tokenizer 10 + 50; MAE: 60),
# each segmentation 30 min with the same head, schedule and steps. All runs sequential, one at a time.
# SMOKE=1 runs every command for a few steps only (checks the pipeline in minutes; numbers meaningless).
# Data: ../shared/data/camvid-160x120.tar.gz (and cifar10-png.tar.gz for the CIFAR-10 backbone).
set -euo pipefail
SHARED=${SHARED:-../shared/data}
CAMVID=${CAMVID:-/tmp/camvid/camvid-160x120}
CIFAR=${CIFAR:-/tmp/cifar}
RUNS=${RUNS:-runs/camvid}
BEIT=${BEIT:-.venv/bin/beit}
PY=${PY:-.venv/bin/python}
mkdir -p "$RUNS"

# budgets: minutes (the binding limit on a busy machine) and steps (the schedule's length). Size the steps so the
# schedule ends inside the minutes (check images_per_s in a short run first): a run cut by --max-minutes
# stops with its learning rate still high.
if [ "${SMOKE:-0}" = 1 ]; then
  TOK=(--steps 4); PRE=(--steps 4); PRE_MAE=(--steps 4); SEG=(--steps 4 train.eval_every=4 train.ckpt_every=4)
else
  TOK=(--steps 1500 --max-minutes 10)
  PRE=(--steps 1500 --max-minutes 50)       # BEiT: + its 10-minute tokenizer = 60 minutes (steps: a guess, see above)
  PRE_MAE=(--steps 2000 --max-minutes 60)   # MAE needs no tokenizer: all 60 minutes (~35 images/s measured)
  SEG=(--max-minutes 30)   # the preset: 800 steps of 8 images (~17 epochs), eval every 200 steps
fi
PX64=(model.img_size=64 model.patch_size=8)   # 64 px squares in 8 px patches: the 8x8 grid of the tokenizer

step() {
  case "$1" in
  data)        # extract CamVid (and CIFAR-10 for the `cifar` step)
    [ -d "$CAMVID" ] || { mkdir -p "$(dirname "$CAMVID")"; tar -xzf "$SHARED/camvid-160x120.tar.gz" -C "$(dirname "$CAMVID")"; }
    [ -d "$CIFAR/train" ] || { mkdir -p "$CIFAR"; tar -xzf "$SHARED/cifar10-png.tar.gz" -C "$CIFAR"; } ;;
  baseline)    # constant prediction (the most frequent training class, road) on val and test
    $PY scripts/constant_baseline.py "$CAMVID" | tee "$RUNS/constant.json" ;;
  tokenizer)   # VQ tokenizer on CamVid train images (no labels), 64 px -> 8x8 ids
    $BEIT tokenizer train --data "$CAMVID/images/train" --val-data "$CAMVID/images/val" --out "$RUNS/tok64_vq" \
      --preset vq_32 "${TOK[@]}" model.img_size=64 model.n_groups=4 train.log_every=25 ;;
  pretrain)    # BEiT and MAE on CamVid train images without labels (random 64 px crops of the 160x120 frames)
    $BEIT pretrain --method beit --data "$CAMVID/images/train" --tokenizer "$RUNS/tok64_vq" --out "$RUNS/pre_beit" \
      --preset beit_tiny_patch4_32 "${PRE[@]}" "${PX64[@]}" train.log_every=10 train.ckpt_every=250
    $BEIT pretrain --method mae --data "$CAMVID/images/train" --out "$RUNS/pre_mae" \
      --preset mae_tiny_patch4_32 "${PRE_MAE[@]}" "${PX64[@]}" train.log_every=10 train.ckpt_every=250 ;;
  cifar)       # the same BEiT recipe on CIFAR-10 train (32 px images upsampled to 64), its own tokenizer
    $BEIT tokenizer train --data "$CIFAR/train" --out "$RUNS/tok64_vq_cifar" --preset vq_32 "${TOK[@]}" \
      model.img_size=64 model.n_groups=4 train.log_every=25
    $BEIT pretrain --method beit --data "$CIFAR/train" --tokenizer "$RUNS/tok64_vq_cifar" --out "$RUNS/pre_beit_cifar" \
      --preset beit_tiny_patch4_32 "${PRE[@]}" "${PX64[@]}" train.log_every=10 train.ckpt_every=250 ;;
  segment)     # same head, schedule and budget from every backbone; eval.json holds val/test of the best val mIoU
    for init in scratch:none beit:"$RUNS/pre_beit" mae:"$RUNS/pre_mae" beit_cifar:"$RUNS/pre_beit_cifar"; do
      name=${init%%:*}; path=${init#*:}
      [ "$path" = none ] || [ -d "$path" ] || { echo "skip $name: no $path"; continue; }
      $BEIT segment --data "$CAMVID" --init "$path" --out "$RUNS/seg_$name" --preset camvid_tiny_patch8_120x160 \
        "${SEG[@]}" train.log_every=10
    done ;;
  table)       # markdown rows: mIoU val / test, mAcc test, per-class test IoU of every segmentation run
    $PY - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
for ev in sorted(runs.glob("seg_*/eval.json")):
    r = json.loads(ev.read_text())
    print(f"| {ev.parent.name} | {r['val']['mIoU']:.2f} | {r['test']['mIoU']:.2f} | {r['test']['mAcc']:.2f} | "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["test"]["iou"].items()) + " |")
EOF
    ;;
  *) echo "unknown step $1"; exit 2 ;;
  esac
}

if [ "${1:-all}" = all ]; then
  for s in data baseline tokenizer pretrain cifar segment table; do step "$s"; done
else
  step "$1"
fi
