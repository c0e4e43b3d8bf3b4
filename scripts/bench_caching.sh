#!/usr/bin/env bash
# Speed/fidelity sweep of the caching methods against diffusers' and cache-dit's caches, interleaved in one run.
# Usage: bash scripts/bench_caching.sh MODEL OUT_DIR [extra accel-bench args]
# Env: PROMPTS=file (default scripts/prompts/flux.txt); MAGCACHE_ARGS=",mag_ratios=[...]" outside FLUX (calibrate first
# with `accel generate ... --accel magcache:calibrate=true`).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-bench-flux}; OUT=${2:-out/bench-caching-$MODEL}; shift 2 || true
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
.venv/bin/accel bench --model "$MODEL" --prompts "${PROMPTS:-scripts/prompts/flux.txt}" --seeds 1 --out "$OUT" \
  --accel "sortblock:K=3,beta=0.1" --accel "sortblock" --accel "sortblock:K=5,beta=0.1" --accel "sortblock:K=8,beta=0.1" \
  --accel "abcache" --accel "abcache:spacing=sigmas" --accel "abcache:spacing=binomial" \
  --accel "abcache:interval=4" --accel "abcache:order=3" \
  --accel "fbcache:threshold=0.05" --accel "fbcache:threshold=0.1" --accel "fbcache:threshold=0.2" \
  --accel "taylorseer" --accel "taylorseer:cache_interval=3" \
  --accel "magcache:threshold=0.06${MAGCACHE_ARGS:-}" --accel "magcache:threshold=0.12${MAGCACHE_ARGS:-}" \
  --accel "dbcache:Fn=1,threshold=0.08" --accel "dbcache:Fn=1,threshold=0.2" \
  "$@"
