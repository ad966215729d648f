#!/usr/bin/env bash
# The smallest useful device call (<= ~4 min): the graphed-MRBP CUDA tests and the LM goal rows.
# Usage (repository root): OUT=DIR bash scripts/gpu_call_min.sh
set -uo pipefail
: "${OUT:?set OUT to an output folder}"
source scripts/device_shim.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_torch_mrbp_model_cuda.py 2>&1 \
  | tail -15 | tee "$OUT/cuda-tests.txt"
timeout 170 python3 -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 --repeat 2 --warmup 1 --check-T 0 \
  --methods bptt,mrbp_graph+host+keep,bptt_graph \
  --out "$OUT/mrbp-lm-issue13-min.json" 2>&1 | tee "$OUT/mrbp-lm-issue13-min.log"
