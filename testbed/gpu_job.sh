#!/bin/bash
# The lent-H200 job that produced the shipped testbed: train, sample + per-head statistics, and the
# uniform-baseline table, everything under $OUT (4 weight shards, results.tar, log.txt).
# Run from the repository root with the diffusers wheel in .whl/ (docs/testbed.md says how).
#   bash testbed/gpu_job.sh MINUTES [extra train args...]
#   bash testbed/gpu_job.sh 6 --init-from testbed/weights --seed 1    # continue the shipped weights
# The job keeps inside one 600 s device call: the baseline table gets at most BASELINE_SECONDS (150)
# and never runs past JOB_SECONDS (570) after the job started; with too little time left it is skipped.
set -uo pipefail
MINUTES=${1:?minutes of training}
shift
RUN=${RUN:-/tmp/testbed_run}
JOB_SECONDS=${JOB_SECONDS:-570}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/sparse_vdit
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
python3 -m sparse_vdit.testbed.train --out "$RUN" --minutes "$MINUTES" "$@" || exit 1
cp "$RUN"/weights/*.safetensors "$OUT"/
echo "trained by ${SECONDS} s"
python3 -m sparse_vdit.testbed.report --weights "$RUN/weights" --out "$RUN/report" --loss-csv "$RUN/loss.csv" ${REPORT_ARGS:-}
echo "report done by ${SECONDS} s"
LEFT=$(( JOB_SECONDS - SECONDS ))
BASELINE=$(( LEFT < ${BASELINE_SECONDS:-150} ? LEFT : ${BASELINE_SECONDS:-150} ))
if [ "$BASELINE" -ge 30 ]; then
  timeout "$BASELINE" python3 -m sparse_vdit.testbed.quality --baselines --weights "$RUN/weights" \
    --out "$RUN/testbed.md" ${QUALITY_ARGS:-}
  echo "baselines ended by ${SECONDS} s (given ${BASELINE} s)"
else
  echo "baselines skipped: ${LEFT} s left of ${JOB_SECONDS} s"
fi
tar -C "$RUN" -cf "$OUT/results.tar" weights/config.json weights/diffusion_pytorch_model.safetensors.index.json \
  loss.csv train_log.json report $(cd "$RUN" && ls testbed.md 2>/dev/null)
ls -la "$OUT"
