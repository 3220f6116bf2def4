#!/usr/bin/env bash
# GPU readiness check (issue 12, item 7); CI never runs it.
#
# On a CUDA machine: the demo chain (stage=all +preset=demo) at bf16 on one device,
# then, with two or more devices, the DDP stages (segment_train, train) again through
# torchrun on every device (variant=ddp of the same run, reading its inputs). Writes
# <OUT>/gpu_check.json: device names, each stage's wall seconds (from its manifest) and
# the metrics the stages wrote. Without a CUDA device it says so and exits 2.
#
#   scripts/gpu_check.sh [OUT_ROOT] [Hydra overrides...]     (default OUT_ROOT outputs/gpu_check)
#   PYTHON=/path/to/python scripts/gpu_check.sh              (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-outputs/gpu_check}
shift || true
EXP=gpu_check

n=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$n" -lt 1 ]; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False);" \
        "nothing was run. Run this on a machine with an NVIDIA GPU." >&2
    exit 2
fi
mkdir -p "$OUT"
common=(paths.root="$OUT" experiment=$EXP hardware.precision=bf16 "$@")

t0=$(date +%s)
"$PY" -m pipeline stage=all +preset=demo hardware=gpu hardware.devices=[0] overwrite=true \
    "${common[@]}" 2>&1 | tee "$OUT/single.log"
single_s=$(($(date +%s) - t0))

ddp_s=null
if [ "$n" -ge 2 ]; then
    t0=$(date +%s)
    for st in segment_train train; do
        "$PY" -m torch.distributed.run --standalone --nproc-per-node="$n" -m pipeline \
            stage=$st +preset=demo hardware=multi_gpu variant=ddp overwrite=true \
            "${common[@]}" 2>&1 | tee -a "$OUT/ddp.log"
    done
    ddp_s=$(($(date +%s) - t0))
fi

"$PY" scripts/gpu_check_report.py "$OUT/$EXP" "$n" "$single_s" "$ddp_s"
