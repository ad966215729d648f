#!/usr/bin/env bash
# Issue 14 (torch, items 1-3) on one GPU, in about 5 minutes: the CUDA tests of the cell-generic
# SAB drivers and of the captured training step, then bench/sab_speed.py (torch; then the JAX
# rows if JAX is there). Everything lands in OUTDIR (default bench/results).
# Usage (repository root, memcore not installed): bash scripts/gpu_issue14.sh [OUTDIR]
set -uo pipefail
out=${1:-bench/results}
mkdir -p "$out"
source scripts/device_shim.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the GPU in one process
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
log="$out/issue14-torch-$gpu.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
} > "$log" 2>&1
run() {  # run CMD with a time limit, logged
  local limit=$1; shift
  echo "+ $*" | tee -a "$log"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "exit status: ${PIPESTATUS[0]}" | tee -a "$log"
}
run 90 python3 -m pytest -q -p no:cacheprovider tests/test_torch_sab_model.py -k "cuda" -rs
run 150 python3 -m bench.sab_speed --backend torch --out "$out/sab-speed-torch-$gpu.json"
run 60 python3 -m bench.sab_speed --backend jax --rows memcore_sab,memcore_lstm_bptt,transfer_eval \
  --steps 20 --out "$out/sab-speed-jax-$gpu.json"
