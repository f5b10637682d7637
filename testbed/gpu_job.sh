#!/bin/bash
# The lent-H200 job that produced the shipped testbed: train, sample + per-head statistics, and the
# uniform-baseline table, everything under $OUT (4 weight shards, results.tar, log.txt).
# Run from the repository root with the diffusers wheel in .whl/ (docs/testbed.md says how).
#   bash testbed/gpu_job.sh MINUTES [extra train args...]
set -uo pipefail
MINUTES=${1:?minutes of training}
shift
RUN=${RUN:-/tmp/testbed_run}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/sparse_vdit
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
python3 -m sparse_vdit.testbed.train --out "$RUN" --minutes "$MINUTES" "$@" || exit 1
cp "$RUN"/weights/*.safetensors "$OUT"/
python3 -m sparse_vdit.testbed.report --weights "$RUN/weights" --out "$RUN/report" --loss-csv "$RUN/loss.csv" ${REPORT_ARGS:-}
timeout "${BASELINE_SECONDS:-150}" python3 -m sparse_vdit.testbed.quality --baselines --weights "$RUN/weights" \
  --out "$RUN/testbed.md" ${QUALITY_ARGS:-}
tar -C "$RUN" -cf "$OUT/results.tar" weights/config.json weights/diffusion_pytorch_model.safetensors.index.json \
  loss.csv train_log.json report $(cd "$RUN" && ls testbed.md 2>/dev/null)
ls -la "$OUT"
