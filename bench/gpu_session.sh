#!/usr/bin/env bash
# One lent-H200 call that refreshes the benchmarks not yet measured (BENCHMARKS.md, "Next GPU
# session"), each step time-boxed so a slow one cannot eat the others; logs and tables under $OUT.
# Run from the repository root with the diffusers wheel in .whl/ (carry .whl):
#   bash bench/gpu_session.sh [tests attention engine tma profile paired gluon gluon_sparse probe rotary e2e search quality parity]
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pp && ln -sfn "$PWD" /tmp/pp/sparse_vdit
export PYTHONPATH=/tmp/site:/tmp/pp PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv
steps=("${@:-attention e2e search quality}")
for step in ${steps[*]}; do
  case $step in
    tests)     SPARSE_VDIT_TRITON_CONFIGS=8x3 timeout "${GPU_TEST_SECONDS:-200}" python3 -m pytest -q tests/gpu ;;
    attention) timeout 150 python3 -m sparse_vdit.bench.attention --quick --out "$OUT" ;;
    engine)    # GPU kernel tests, then every family at the two shapes with all dense baselines (~500 s)
               # (one config per key: the tests check results, and tuning every key ran past 180 s)
               SPARSE_VDIT_TRITON_CONFIGS=8x3 timeout "${GPU_TEST_SECONDS:-200}" python3 -m pytest -q tests/gpu
               timeout "${ENGINE_SECONDS:-300}" python3 -m sparse_vdit.bench.attention --shapes "${ENGINE_SHAPES:-cogvideox,wan14b}" \
                 --densities "${ENGINE_DENSITIES:-0.1,0.3,0.5}" ${ENGINE_FAMILIES:+--families $ENGINE_FAMILIES} \
                 --baselines "${ENGINE_BASELINES:-cudnn,flash,sage}" --flex-shapes "${ENGINE_FLEX-wan14b}" \
                 --cube-walks --out "$OUT/engine" ;;
    tma)       # autotuned load path (TMA or gathered, the default) vs gathered loads only (SPARSE_VDIT_TMA=0)
               for tma in 1 0; do
                 SPARSE_VDIT_TMA=$tma timeout 200 python3 -m sparse_vdit.bench.attention --shapes wan14b,cogvideox \
                   --densities 0.1,0.3 --families diagonal,local_window --baselines cudnn --flex-shapes "" \
                   --tiles "$([ $tma = 1 ] && echo 128x64,128x128 || echo 128x64)" --out "$OUT/tma$tma"
               done ;;
    profile)   # head_dim 64 at low density: each config alone, then 64x64 tiles (5 x ~60 s), then counters of the
               # autotuned launches (bench/profile_layer.py; ncu reads counters on Firecracker machines)
               for cfg in 8x3 8x3r128 8x2 4x3 64x64tiles; do
                 tiles=$([ $cfg = 64x64tiles ] && echo 64x64 || echo 128x64)
                 SPARSE_VDIT_TRITON_CONFIGS=$([ $cfg = 64x64tiles ] || echo $cfg) timeout 90 python3 -m sparse_vdit.bench.attention \
                   --shapes cogvideox --densities 0.1 --families diagonal,vertical_stripe,multi_diagonal --tiles $tiles \
                   --baselines none --flex-shapes "" --out "$OUT/profile_$cfg"
               done
               # (two configs only: every launch of the tuning runs under ncu's interception too)
               SPARSE_VDIT_TRITON_CONFIGS=8x3,8x3r128 timeout "${NCU_SECONDS:-150}" ncu --clock-control none \
                 --nvtx --nvtx-include "profile/" \
                 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                 python3 -m sparse_vdit.bench.profile_layer --shape cogvideox ;;
    paired)    # full tiles one or two a step, each forced, next to the autotuned choice; then the GPU tests of
               # both ways and of the testbed's GPU batches (one config per key)
               SPARSE_VDIT_TRITON_CONFIGS=8x3 timeout "${GPU_TEST_SECONDS:-120}" python3 -m pytest -q tests/gpu \
                 -k "paired or testbed"
               timeout "${PAIRED_SECONDS:-360}" python3 -m sparse_vdit.bench.attention --shapes cogvideox,wan14b \
                 --densities 0.1,0.5 --families diagonal,multi_diagonal --baselines cudnn --flex-shapes "" \
                 --paired-tiles --out "$OUT/paired" ;;
    gluon)     # the Gluon full-tile prototype (bench/gluon_dense.py): its GPU test, then timed against cuDNN
               timeout 120 python3 -m pytest -q tests/gpu/test_gluon_dense_gpu.py
               timeout "${GLUON_SECONDS:-120}" python3 -m sparse_vdit.bench.gluon_dense --out "$OUT/gluon_dense.md" ;;
    gluon_sparse)  # the Gluon sparse kernel: its GPU tests (GS_TESTS=0 skips them), then every row timed under each
               # GS_MODES kernel (GS_FLAGS: more bench/attention.py flags, e.g. --fast-start)
               [ "${GS_TESTS:-1}" = 0 ] || SPARSE_VDIT_TRITON_CONFIGS=8x3 timeout 150 python3 -m pytest -q tests/gpu -k gluon_kernel
               timeout "${GS_COGX_SECONDS:-150}" python3 -m sparse_vdit.bench.attention --shapes cogvideox \
                 --densities "${GS_DENSITIES:-0.1,0.3}" --families "${GS_COGX_FAMILIES:-diagonal,multi_diagonal,vertical_stripe}" \
                 --baselines cudnn --flex-shapes "" --gluon "${GS_MODES:-0,1,r128,ws}" ${GS_FLAGS:-} --out "$OUT/gluon_cogx"
               timeout "${GS_WAN_SECONDS:-250}" python3 -m sparse_vdit.bench.attention --shapes wan14b \
                 --densities "${GS_DENSITIES:-0.1,0.5}" --families "${GS_WAN_FAMILIES:-diagonal,multi_diagonal}" \
                 --tiles "${GS_WAN_TILES:-128x64}" --baselines cudnn --flex-shapes "" --gluon "${GS_MODES:-0,1,r128,ws}" \
                 ${GS_FLAGS:-} --out "$OUT/gluon_wan" ;;
    probe)     # what a masked tile and a program cost, in full tiles, on synthetic layers (bench/tile_cost_fit.py)
               for shape in cogvideox wan14b; do
                 timeout "${PROBE_SECONDS:-120}" python3 -m sparse_vdit.bench.tile_cost_fit --probe --shape $shape \
                   --gluon "${PROBE_MODES:-0,auto}" --out "$OUT/probe_$shape.md"
               done ;;
    rotary)    # the one-pass RoPE kernel: bit-identity at real sizes, then its time against diffusers' math
               timeout 120 python3 -m pytest -q tests/gpu/test_rotary_gpu.py
               timeout 120 python3 -m sparse_vdit.bench.rotary --out "$OUT/rotary.md" ;;
    e2e)       timeout "${E2E_SECONDS:-300}" python3 -m sparse_vdit.bench.e2e --models "${E2E_MODELS:-hunyuan,cogvideox,wan13b}" --repeats "${E2E_REPEATS:-1}" \
                 --out "$OUT/e2e.md" ;;
    search)    timeout "${SEARCH_SECONDS:-120}" python3 -m sparse_vdit.bench.search --out "$OUT/search.md" ;;
    quality)   timeout "${QUALITY_SECONDS:-300}" python3 -m sparse_vdit.bench.search_quality --targets 4,3,6,10 --out "$OUT/search_quality.md" ;;
    parity)    # ComfyUI's native Wan + Apply vs the adapter (needs .comfy from bench/pack_comfyui.sh, carried)
               python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .comfy/wheels/*.whl
               PYTHONPATH=$PYTHONPATH:$PWD/.comfy/ComfyUI COMFYUI_ROOT=$PWD/.comfy/ComfyUI timeout "${PARITY_SECONDS:-280}" \
                 python3 -m sparse_vdit.bench.comfyui_parity --model wan13b --repeats 5 --warmup 2 \
                 --budget "${PARITY_BUDGET:-170}" --out "$OUT/comfyui_parity.md" ;;
    *) echo "unknown step $step (tests attention engine tma profile paired gluon gluon_sparse probe rotary e2e search quality parity)"; exit 2 ;;
  esac 2>&1 | tee "$OUT/$step.log" | grep -E "^\||rror" || true
done
# at most 8 files come back: everything goes home as one archive
tar -C "$OUT" -czf /tmp/gpu_session.tgz . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu_session.tgz "$OUT"/
