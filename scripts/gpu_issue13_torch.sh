#!/usr/bin/env bash
# Issue 13 (item 2), one device call of at most ~8 minutes: the model-agnostic torch MRBP on CUDA.
# Usage (repository root, memcore not installed): OUT=DIR bash scripts/gpu_issue13_torch.sh
# (OUT defaults to bench/results). Writes, in order (each step keeps its output if a later one
# is cut off):
#   torch-mrbp-model-cuda-pytest.txt  CUDA tests of memcore.backends.torch.mrbp_model and the stash
#   segment-bytes-issue13-h200.json   what one LM segment saves, incl. the lean replayed segment
#   mrbp-lm-issue13-h200.{json,log}   the LM table of bench/results/mrbp-lm-final-h200.json, MRBP
#                                     now through the library API, plus the +lean, +keep variants
#   mrbp-lm-issue13-fused-h200.{json,log}  the same lean variants with the fused Triton write
set -uo pipefail
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
source scripts/device_shim.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu-issue13-torch-device.txt"

timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_torch_mrbp_model_cuda.py \
  tests/test_torch_stash.py 2>&1 | tee "$OUT/torch-mrbp-model-cuda-pytest.txt"

timeout 45 python3 -m bench.segment_bytes --out "$OUT/segment-bytes-issue13-h200.json"

# Same command as the final table of issue 7 (docs/performance.md section 1), with the new
# variants added: mrbp_graph+host+lean recomputes every block but the write; +keep also keeps
# the layers' outputs from the no-grad forward (keep_blocks), so the replay runs no layer twice.
timeout 250 python3 -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 \
  --methods bptt,checkpoint,mrbp,mrbp_graph,mrbp_graph+host,mrbp+host+layers,mrbp_graph+host+layers,mrbp_graph+host+lean,mrbp_graph+host+keep,bptt_graph \
  --out "$OUT/mrbp-lm-issue13-h200.json" 2>&1 | tee "$OUT/mrbp-lm-issue13-h200.log"

timeout 100 python3 -m bench.mrbp_lm --T 8,32 --precision fp32,bf16 --write fused --check-T 0 \
  --methods bptt,mrbp_graph+host+lean,mrbp_graph+host+keep,bptt_graph \
  --out "$OUT/mrbp-lm-issue13-fused-h200.json" 2>&1 | tee "$OUT/mrbp-lm-issue13-fused-h200.log"
