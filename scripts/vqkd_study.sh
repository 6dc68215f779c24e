#!/usr/bin/env bash
# Issue 29's study: does BEiT on semantic tokens (VQ-KD, BEiT v2) distilled from this toolkit's MAE pay on
# CIFAR-10 with 1,000 labels, at the CPU budgets of docs/notebook/2026-11-cifar10-hour.md?
#
# Rows (each fine-tuned with the tiny preset's recipe -- mean head and grid head, HEADS -- and probed kNN / linear):
#   pixels          raw pixels, no learning (probes only)
#   scratch         the fine-tuning recipe from a random initialisation
#   mae             the teacher: MAE's hour (section 8.1's budget, 10,800 steps of 64)
#   beit_vq         BEiT on VQ-VAE tokens (vq_32_small): tokenizer + BEiT = BUDGET minutes (section 8.5's row)
#   beit_vqkd       BEiT on VQ-KD tokens from the MAE teacher: tokenizer + BEiT = BUDGET minutes
#   beit_vqkd_agg   the same with patch aggregation (beit.patch_aggregation=true)
#   beit_featreg    the ablation: BEiT regressing the teacher's features directly, no quantisation
#                   (beit.target=teacher), for the whole BUDGET (it needs no tokenizer)
#
# Usage: bash scripts/vqkd_study.sh RUNS
#   env: CIFAR    folder with train/<class>/ and test/<class>/ (default /tmp/cifar; tar -xzf
#                 ../shared/data/cifar10-png.tar.gz -C /tmp/cifar)
#        BEIT     the command (default "python -m beit"); PY the python of that install (default python)
#        BUDGET   pretraining minutes after the teacher, tokenizer included (default 60)
#        TEACHER  an existing MAE run to use as the teacher (skips the MAE hour)
#        JOBS     runs at once (default 1: the issue's one thread; 2 on a 2-core machine doubles the clock)
#        EXTRA    extra flags for every training command (e.g. "--device cuda --workers 3")
#        HEADS    fine-tuning heads: "0 4" (default: mean head = R1, 4x4 grid head = R2), "4" for the grid head only
#        SMOKE=1  a tiny pass of every command (synthetic 32 px images, 2-4 steps each, minutes): checks the
#                 script, not the method
# Order: first every timed run (tokenizers, then BEiT for the rest of BUDGET; with JOBS=2 two lanes: VQ tokenizer ->
# BEiT-VQ -> feature regression, and VQ-KD tokenizer -> BEiT-VQ-KD -> with aggregation), then the untimed fine-tunes
# and probes, so that a timed run only ever shares the machine with other timed runs. Every training command runs
# with --resume-or-start: rerunning the script after a stop continues where it was.
# The machine (CPU model, torch's ISA) goes to RUNS/machine.txt; per-stage minutes to RUNS/minutes.txt;
# scripts/study_summary.py RUNS prints the table.
set -uo pipefail
HERE=${HERE:-$(dirname "$0")}  # where the helper scripts are (set it when running a copy of this file)
RUNS=${1:?usage: vqkd_study.sh RUNS}
CIFAR=${CIFAR:-/tmp/cifar}
BEIT=${BEIT:-python -m beit}
PY=${PY:-python}
BUDGET=${BUDGET:-60}
JOBS=${JOBS:-1}
HEADS=${HEADS:-0 4}
EXTRA=${EXTRA:-}
SMOKE=${SMOKE:-0}
LPC=100        # labels per class: 1,000 labels
SCALE=1.0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUNS"
if [ "$SMOKE" = 1 ]; then  # a synthetic CIFAR-shaped folder: 10 classes x 6 train / 3 test images, 32 px
  CIFAR="$RUNS/smoke_data"; LPC=4; SCALE=0.0004; BUDGET=${BUDGET_SMOKE:-30}; EXTRA="$EXTRA --batch-size 4"
  "$PY" - "$CIFAR" <<'EOF' || { echo "could not write the smoke data with $PY (numpy, PIL)"; exit 1; }
import sys, numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:32, 0:32] / 31
for split, n in (("train", 6), ("test", 3)):
    for c in range(10):
        d = Path(sys.argv[1]) / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.uniform(0, 1, 3) + rng.uniform(-.5, .5, 3) * xx[..., None] + rng.uniform(-.5, .5, 3) * yy[..., None]
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(d / f"{i}.png")
EOF
fi
mkdir -p "$CIFAR/ft"
ln -sfn "$CIFAR/train" "$CIFAR/ft/train"
ln -sfn "$CIFAR/test" "$CIFAR/ft/val"
steps() { python3 -c "print(max(2, round($1 * $SCALE)))"; }
log() { echo "[$(date +%H:%M:%S)] $*"; }
slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }
minutes() {  # RUN: the training minutes its metrics.jsonl recorded (last elapsed_s)
  python3 - "$1" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(x) for x in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
print(f"{max([r['elapsed_s'] for r in rows if 'elapsed_s' in r] or [0]) / 60:.2f}")
EOF
}
left() { python3 -c "print(max(0.5, $BUDGET - $1))"; }  # BEiT minutes left after a tokenizer of $1 minutes

run() {  # NAME CMD...: run one command, its log in RUNS/NAME.log, its status in RUNS/status.txt
  local name=$1; shift
  log "start $name"
  if "$@" > "$RUNS/$name.log" 2>&1; then echo "$name ok" >> "$RUNS/status.txt"; log "done $name"
  else echo "$name FAILED" >> "$RUNS/status.txt"; log "FAILED $name: $(tail -n 2 "$RUNS/$name.log" | tr '\n' ' ')"; fi
}

done_ok() { grep -qx "$1 ok" "$RUNS/status.txt" 2>/dev/null; }  # NAME finished in an earlier pass

finetune() {  # NAME INIT: section 8.5's fine-tuning and probes of one initialisation; study_summary.py's
  local name=$1 init=$2  # columns: R1 = the preset's mean head, R2 = the grid head (model.head_grid=4)
  local h
  for h in $HEADS; do
    local r=1; [ "$h" = 4 ] && r=2
    done_ok "ft_r${r}_$name" && continue
    slot; run "ft_r${r}_$name" $BEIT finetune --data "$CIFAR/ft" --init "$init" --out "$RUNS/ft_r${r}_$name" \
      --preset beit_tiny_patch4_32 --labels-per-class $LPC --steps "$(steps 1300)" $EXTRA --resume-or-start \
      train.eval_every=100000 model.head_grid=$h &
  done
  for p in knn linear; do
    [ "$init" = none ] && break
    done_ok "probe_${p}_$name" && continue
    slot; run "probe_${p}_$name" $BEIT probe $p --data "$CIFAR/ft" --init "$init" --labels-per-class $LPC \
      --layers all --pool all --out "$RUNS/probe_${p}_$name.json" &
  done
}

pretrain() {  # NAME ARGS...: one timed pretraining (online kNN on the labelled data); fine-tuned in phase 2
  local name=$1; shift
  if ! done_ok "pre_$name"; then
    run "pre_$name" $BEIT pretrain --data "$CIFAR/train" --out "$RUNS/pre_$name" --probe-data "$CIFAR/ft" "$@" \
      "train.probe_every=$(steps 1000)" train.fit_to_time=true --resume-or-start $EXTRA
    echo "pre_$name $(minutes "$RUNS/pre_$name")" >> "$RUNS/minutes.txt"
  fi
}

tokenizer() {  # NAME ARGS...: one timed tokenizer run; prints its minutes
  local name=$1; shift
  done_ok "$name" || run "$name" $BEIT tokenizer train --data "$CIFAR/train" --val-data "$CIFAR/test" \
    --out "$RUNS/$name" --steps "$(steps 1500)" --resume-or-start $EXTRA train.eval_every=100000 "$@" >&2
  local t; t=$(minutes "$RUNS/$name")
  grep -q "^$name " "$RUNS/minutes.txt" 2>/dev/null || echo "$name $t" >> "$RUNS/minutes.txt"
  echo "$t"
}

log "study in $RUNS (BUDGET=$BUDGET min, JOBS=$JOBS, SMOKE=$SMOKE, EXTRA=$EXTRA)"
{ grep -m1 'model name' /proc/cpuinfo; python3 -c "import torch; print('torch', torch.__version__, 'ISA',
  torch.backends.cpu.get_cpu_capability(), 'threads', torch.get_num_threads())"; echo "OMP_NUM_THREADS=$OMP_NUM_THREADS";
  git -C "$HERE" rev-parse --short HEAD; } > "$RUNS/machine.txt" 2>&1
# the teacher: MAE's hour, or a given run
if [ -z "${TEACHER:-}" ]; then
  pretrain mae --method mae --steps "$(steps 10800)"
  TEACHER="$RUNS/pre_mae"
fi

# phase 1, timed: the tokenizers and BEiT at equal minutes after the teacher (steps far beyond the budget, and
# train.fit_to_time shortens each run to what its minutes allow, so its schedule completes). VQ-VAE tokens: section 8.5's tokenizer (vq_32_small, ~7-9 minutes); VQ-KD from the MAE
# teacher (vqkd_32: 1024 x 32 codes, 4-block encoder, 1-block decoder, ~13 minutes in bf16 with the fp32 teacher)
LONG=$(steps 100000)
[ "$SMOKE" = 1 ] && LONG=3
lane_vq() {
  local t; t=$(tokenizer tok_vq --preset vq_32_small)
  pretrain beit_vq --tokenizer "$RUNS/tok_vq" --preset beit_tiny_patch4_32 --steps "$LONG" --max-minutes "$(left "$t")"
  pretrain beit_featreg --preset beit_tiny_patch4_32 --steps "$LONG" --max-minutes "$(left 0)" \
    beit.target=teacher "beit.teacher=$TEACHER"
}
lane_vqkd() {
  local t; t=$(tokenizer tok_vqkd --objective vqkd --teacher "$TEACHER" --preset vqkd_32 --max-minutes 15)
  done_ok eval_vqkd || run eval_vqkd $BEIT tokenizer eval --tokenizer "$RUNS/tok_vqkd" --data "$CIFAR/test"
  pretrain beit_vqkd --tokenizer "$RUNS/tok_vqkd" --preset beit_tiny_patch4_32 --steps "$LONG" \
    --max-minutes "$(left "$t")"
  pretrain beit_vqkd_agg --tokenizer "$RUNS/tok_vqkd" --preset beit_tiny_patch4_32 --steps "$LONG" \
    --max-minutes "$(left "$t")" beit.patch_aggregation=true
}
if [ "$JOBS" -ge 2 ]; then lane_vq & lane_vqkd & wait; else lane_vq; lane_vqkd; fi

# phase 2, untimed: fine-tunes and probes (the BEiT rows first), baselines, the teacher's precision check
for name in beit_vqkd beit_vq beit_vqkd_agg beit_featreg; do
  [ -d "$RUNS/pre_$name/checkpoints" ] && finetune "$name" "$RUNS/pre_$name"
done
for p in knn linear; do
  done_ok "probe_${p}_pixels" && continue
  slot; run "probe_${p}_pixels" $BEIT probe $p --data "$CIFAR/ft" --init pixels --labels-per-class $LPC \
    --out "$RUNS/probe_${p}_pixels.json" &
done
finetune mae "$TEACHER"
finetune scratch none
# how far bf16 moves the teacher's features (the VQ-KD targets run in fp32 unless vqkd.teacher_precision=bf16)
done_ok teacher_precision || { slot; run teacher_precision $PY "$HERE/teacher_precision.py" "$TEACHER" "$CIFAR/test" --n 256; }
wait
log "all done"
python3 "$HERE/study_summary.py" "$RUNS"
cat "$RUNS/minutes.txt"
