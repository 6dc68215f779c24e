#!/usr/bin/env bash
# The GPU check of beit: CUDA tests, pretraining (BEiT/MAE/iBOT, bf16 and fp16), fine-tuning, segmentation,
# torchrun (nccl), resume after SIGKILL and the step benchmark against HF, in one run (no new step after
# 360 s: CUDA tests and the benchmarks first, then the commands; --budget-s S to change it).
#
#   scripts/gpu_check.sh RESULTS.json            # on a CUDA machine, from the repository root
#   scripts/gpu_check.sh RESULTS.json --dry-run  # the same steps on CPU; CUDA-only steps skipped
#
# Writes one JSON file (every step's status, seconds, details and output tail). Needs no network: the data
# are written from the images shipped in beit/data/embedded. Exit status 1 if any step failed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh RESULTS.json [--dry-run] [--budget-s S]}
shift
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if .venv/bin/python -c 'import torch' 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== $PY: python and torch"
if ! "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'; then
    mkdir -p "$(dirname "$OUT")"
    echo '{"summary": {"pass": 0, "fail": 1, "skipped": 0}, "steps": [{"name": "import torch", "status": "fail"}]}' > "$OUT"
    echo "gpu_check: cannot import torch with $PY (set PYTHON=...)"
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L
exec "$PY" scripts/gpu_check.py --out "$OUT" "$@"
