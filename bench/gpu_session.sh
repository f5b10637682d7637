#!/usr/bin/env bash
# One lent-H200 call that refreshes the benchmarks not yet measured (BENCHMARKS.md, "Next GPU
# session"), each step time-boxed so a slow one cannot eat the others; logs and tables under $OUT.
# Run from the repository root with the diffusers wheel in .whl/ (carry .whl):
#   bash bench/gpu_session.sh [attention e2e search quality]
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/sparse_vdit
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv
steps=("${@:-attention e2e search quality}")
for step in ${steps[*]}; do
  case $step in
    attention) timeout 150 python3 -m sparse_vdit.bench.attention --quick --out "$OUT" ;;
    e2e)       timeout 300 python3 -m sparse_vdit.bench.e2e --models hunyuan,cogvideox,wan13b --out "$OUT/e2e.md" ;;
    search)    timeout 120 python3 -m sparse_vdit.bench.search --out "$OUT/search.md" ;;
    quality)   timeout 300 python3 -m sparse_vdit.bench.search_quality --targets 4,3,6,10 --out "$OUT/search_quality.md" ;;
    *) echo "unknown step $step (attention e2e search quality)"; exit 2 ;;
  esac 2>&1 | tee "$OUT/$step.log" | grep -E "^\||rror" || true
done
