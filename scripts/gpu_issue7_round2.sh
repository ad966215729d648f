#!/usr/bin/env bash
# Issue 7, second pass: the commands of the H200 device calls of this round, in order.
# Usage (repository root, memcore not installed): OUT=DIR bash scripts/gpu_issue7_round2.sh CALL
# CALL is 1..8 (each was one device call of at most 10 minutes, run from a clean export of the
# commit then current); outputs were copied into bench/results and conformance/results.
set -uo pipefail
: "${OUT:?set OUT to an output folder}"
source scripts/device_shim.sh
export PYTHONUNBUFFERED=1
xla() { XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_at "$@"; }

case "${1:?call number 1..8}" in
1)  # stash CUDA tests; first LM table with the new variants; first torch fit
  python3 -m pytest -q -p no:cacheprovider tests/test_torch_stash.py | tee "$OUT/stash-pytest-h200.txt"
  python3 -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 \
    --methods bptt,mrbp,mrbp_graph,mrbp+host,mrbp_graph+host,mrbp_graph+layers,mrbp_graph+host+layers,bptt_graph \
    --out "$OUT/mrbp-lm-v2-h200.json" 2>&1 | tee "$OUT/mrbp-lm-v2-h200.log"
  python3 -m bench.mrbp_lm --T 8,32 --precision fp32 --methods bptt,checkpoint,mrbp,mrbp_graph,mrbp_graph+host+layers \
    --repeat 2 --warmup 1 --check-T 0 --fit-gib 40 --fit-max-T 1536 --out "$OUT/mrbp-lm-fit-v2-h200.json" ;;
2)  # LM table after the harness fixes; torch fit in 40 GiB (bracketed search)
  python3 -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 \
    --methods bptt,mrbp,mrbp_graph,mrbp+host+layers,mrbp_graph+host,mrbp_graph+host+layers,bptt_graph \
    --out "$OUT/mrbp-lm-v3-h200.json" 2>&1 | tee "$OUT/mrbp-lm-v3-h200.log"
  python3 -m bench.mrbp_lm --T 8,32 --precision fp32 --methods bptt,checkpoint,mrbp,mrbp_graph,mrbp_graph+host+layers \
    --repeat 2 --warmup 1 --check-T 0 --fit-gib 40 --fit-max-T 1536 \
    --out "$OUT/mrbp-lm-fit-v3-h200.json" 2>&1 | tee "$OUT/mrbp-lm-fit-v3-h200.log" ;;
3)  # LM fp32; Triton write with the fused BMN backward; JAX Pallas write
  python3 -m bench.mrbp_lm --T 8,32 --precision fp32 --methods bptt,mrbp,mrbp_graph,mrbp_graph+host+layers,mrbp+host+layers \
    --out "$OUT/mrbp-lm-v4-fp32-h200.json"
  python3 -m bench.write_kernel --B 16,64 --K 64,1024 --L 128 --D 512 --H 8 --dtype float32,bfloat16 --repeat 20 \
    --out "$OUT/write-kernel-bmn-fused-h200.json"
  xla python3 -m bench.write_kernel_jax_cupy --frameworks jax --jax-variants jax,pallas --B 2 --K 40 --L 12 --D 32 --H 2 \
    --dtype float32 --repeat 3 | tee "$OUT/pallas-tiny-h200.log"
  xla python3 -m bench.write_kernel_jax_cupy --frameworks jax --B 16,64 --K 64,1024 --out "$OUT/write-kernel-jax-pallas-h200.json" ;;
4)  # CuPy tests, conformance and write bench with the fused slot backward
  python3 -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py tests/test_cupy_slot_backward_emulation.py
  python3 -m memcore verify --backend cupy --device cuda:0 --dtype float64,float32 --profile ci --json "$OUT/cupy-h200-verify.json"
  python3 -m memcore verify --backend cupy --device cuda:0 --dtype float16 --profile ci --json "$OUT/cupy-h200-verify-float16.json"
  python3 -m bench.write_kernel_jax_cupy --frameworks cupy --B 16,64 --K 64,1024 --out "$OUT/write-kernel-cupy-v2-h200.json" ;;
5)  # JAX LM table and first fit; CuPy tests with the measured gates
  python3 -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py tests/test_cupy_slot_backward_emulation.py
  xla python3 -m bench.mrbp_lm_jax --T 8,32 --precision fp32 --methods checkpoint,mrbp_scan --check-T 0 --warmup 1 \
    --repeat 3 --fit-gib 40 --worker-timeout 150 --out "$OUT/mrbp-lm-jax-fit-h200.json" ;;
6)  # JAX fit continued from call 5 (file committed as bench/results/mrbp-lm-jax-fit-h200.json); JAX conformance
  xla python3 -m bench.mrbp_lm_jax --methods checkpoint,mrbp_scan --fit-gib 40 --fit-rounds 2 \
    --fit-from bench/results/mrbp-lm-jax-fit-h200.json --worker-timeout 140 --out "$OUT/mrbp-lm-jax-fit2-h200.json"
  JAX_ENABLE_X64=1 python3 -m memcore verify --backend jax --device cuda:0 --dtype float64,float32 --profile ci \
    --json "$OUT/jax-h200-verify.json" ;;
7)  # final torch LM table; segment bytes; CuPy tests after the module split
  python3 -m bench.segment_bytes --out "$OUT/segment-bytes-h200.json"
  python3 -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 \
    --methods bptt,checkpoint,mrbp,mrbp_graph,mrbp_graph+host,mrbp+host+layers,mrbp_graph+host+layers,bptt_graph \
    --out "$OUT/mrbp-lm-final-h200.json" 2>&1 | tee "$OUT/mrbp-lm-final-h200.log"
  python3 -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py tests/test_cupy_slot_backward_emulation.py ;;
8)  # after the review fixes (shared routing validator, shared CuPy test cases): torch, CuPy, stash
  python3 -m pytest -q -p no:cacheprovider tests/test_torch_stash.py
  python3 -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py tests/test_cupy_slot_backward_emulation.py
  python3 -m memcore verify --backend torch --device cuda:0 --dtype float32,bfloat16,float64 --profile ci \
    --json "$OUT/torch-h200-verify.json" ;;
*) echo "unknown call $1: expected 1..8" >&2; exit 2 ;;
esac
