#!/usr/bin/env bash
# Issue 7 benchmark 4 follow-up: sparse replay's growth beyond stored memories for smaller
# scoring blocks (SCORE_BLOCK_ELEMENTS), as run on the lent H200. Usage: bash scripts/gpu_sab_block.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
source scripts/device_shim.sh
for blk in 65536 16384; do
  cmd="python3 -m bench.sab_replay --T 1000,5000 --methods sparse_replay --warmup-T 100 --repeat 1 --min-repeat 1 --config-budget-s 6 --score-block $blk --out $out/sab-replay-block$blk-h200.json"
  echo "+ $cmd" | tee -a "$out/sab-replay-blocks-h200.log"
  PYTHONUNBUFFERED=1 $cmd 2>&1 | tee -a "$out/sab-replay-blocks-h200.log"
done
