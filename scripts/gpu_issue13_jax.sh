#!/usr/bin/env bash
# Issue 13, item 3: the model-agnostic JAX MRBP on the GPU, one device call (<= ~6 minutes).
# Usage (repository root, memcore not installed): OUT=DIR bash scripts/gpu_issue13_jax.sh
#  1. the offload tests of tests/test_jax_mrbp_model.py on the GPU (float64): MRBP with the
#     stored memories in pinned host memory equals BPTT, and the program places them there;
#  2. the LM bench at its default sizes (B=16, L=128, D=512, H=8, K=1024, vocab 8192, 4 layers;
#     those of bench/results/mrbp-lm-jax-h200.json), ONE process (--inprocess): BPTT,
#     per-segment checkpointing, MRBP and MRBP with offload="host", T=8 and 32, fp32 then bf16.
#     Memory ratios come from each compiled program's XLA plan (temp + arguments + outputs -
#     aliased; the allocator's peak cannot be reset within a process); speed is the median of
#     5 timed runs after 1 warm-up. Rows are written to the JSON as they finish, so a run cut
#     short by the timeout still leaves fp32.
# Goal (issue 13): MRBP memory <= 0.15x / <= 0.06x BPTT at T=8 / 32 and speed >= 1.0x BPTT.
set -uo pipefail
: "${OUT:?set OUT to an output folder}"
source scripts/device_shim.sh
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_at"
PRECISION="${PRECISION:-fp32,bf16}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-issue13-jax-device.txt"
JAX_ENABLE_X64=1 timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_jax_mrbp_model.py \
  -k "offload" 2>&1 | tail -5 | tee "$OUT/mrbp-model-jax-offload-pytest.txt"
timeout 330 python3 -m bench.mrbp_lm_jax --inprocess --T 8,32 --precision "$PRECISION" \
  --methods bptt,checkpoint,mrbp,mrbp_host --check-T 0 --warmup 1 --repeat 5 \
  --out "$OUT/mrbp-lm-jax-issue13.json" 2>&1 | tee "$OUT/mrbp-lm-jax-issue13.log"
echo "exit ${PIPESTATUS[0]}"
