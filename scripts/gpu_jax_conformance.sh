#!/usr/bin/env bash
# GPU half of the JAX conformance run (issue 5) plus the torch~jax cross check on CUDA,
# as run on the lent H200. Usage (repository root, memcore not installed):
#   bash scripts/gpu_jax_conformance.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
source scripts/device_shim.sh
export JAX_ENABLE_X64=1   # before JAX is first imported: float64 on the GPU
cmd="python3 -m memcore verify --backend jax,torch --device cuda:0 --dtype float64,float32 --profile ci --json $out/jax-torch-h200-verify.json"
echo "+ $cmd" | tee "$out/jax-torch-h200-verify.txt"
PYTHONUNBUFFERED=1 $cmd 2>&1 | tee -a "$out/jax-torch-h200-verify.txt"
echo "exit status: ${PIPESTATUS[0]}" | tee -a "$out/jax-torch-h200-verify.txt"
cmd32="python3 -m memcore verify --backend jax --device cuda:0 --profile ci --no-self-check --json $out/jax-x32-h200-verify.json"
echo "+ JAX_ENABLE_X64=0 $cmd32" | tee "$out/jax-x32-h200-verify.txt"
JAX_ENABLE_X64=0 PYTHONUNBUFFERED=1 $cmd32 2>&1 | tee -a "$out/jax-x32-h200-verify.txt"
echo "exit status: ${PIPESTATUS[0]}" | tee -a "$out/jax-x32-h200-verify.txt"
