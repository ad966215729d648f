#!/usr/bin/env bash
# One device call (<= ~9 min) with this session's most needed GPU figures, in order of need:
#  1. CUDA tests of the model-agnostic torch MRBP (graph=True, host stash) and the stash;
#  2. the issue-13 torch LM table through the library API (fp32 and bf16, T=8 and 32);
#  3. issue 14's SAB speed bench (torch rows).
# Usage (repository root): OUT=DIR bash scripts/gpu_call1.sh
set -uo pipefail
: "${OUT:?set OUT to an output folder}"
source scripts/device_shim.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_torch_mrbp_model_cuda.py \
  tests/test_torch_stash.py tests/test_torch_sab_model.py -k "cuda or CUDA or graph or stash" 2>&1 \
  | tail -25 | tee "$OUT/cuda-tests.txt"
timeout 200 python3 -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 --repeat 3 --warmup 2 --check-T 0 \
  --methods bptt,mrbp_graph+host+lean,mrbp_graph+host+keep,bptt_graph \
  --out "$OUT/mrbp-lm-issue13.json" 2>&1 | tee "$OUT/mrbp-lm-issue13.log"
timeout 80 python3 -m bench.sab_speed --backend torch --steps 20 --out "$OUT/sab-speed-torch.json" 2>&1 \
  | tee "$OUT/sab-speed-torch.log"
