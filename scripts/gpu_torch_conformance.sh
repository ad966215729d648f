#!/usr/bin/env bash
# GPU half of the torch conformance run (issue 4), as run on the lent H200.
# Usage (repository root, memcore not installed): bash scripts/gpu_torch_conformance.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
source scripts/device_shim.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
python3 -c "import torch, jax, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'jax', jax.__version__, 'numpy', numpy.__version__)" >> "$out/gpu.txt" 2>&1
cmd="python3 -m memcore verify --backend torch --device cuda:0 --dtype float32,bfloat16,float64 --profile ci --json $out/torch-h200-verify.json"
echo "+ $cmd" | tee "$out/torch-h200-verify.txt"
PYTHONUNBUFFERED=1 $cmd 2>&1 | tee -a "$out/torch-h200-verify.txt"
echo "exit status: ${PIPESTATUS[0]}" | tee -a "$out/torch-h200-verify.txt"
