#!/usr/bin/env bash
# One device call (<= 10 min): the JAX half of issue 13 (fp32 only) and issue 14's speed bench.
# Usage (repository root): OUT=DIR bash scripts/gpu_issue13_14_b.sh
set -uo pipefail
: "${OUT:?set OUT to an output folder}"
PRECISION=fp32 bash scripts/gpu_issue13_jax.sh
bash scripts/gpu_issue14.sh "$OUT"
