#!/usr/bin/env bash
# GPU run of the CuPy backend (issue 6): its tests, then memcore verify in float64/float32
# and float16, as run on the lent H200. Usage (repository root, memcore not installed):
#   bash scripts/gpu_cupy_conformance.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
source scripts/device_shim.sh
python3 -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py 2>&1 | tee "$out/cupy-h200-pytest.txt"
for spec in "float64,float32:cupy-h200-verify" "float16:cupy-h200-verify-float16"; do
  dt=${spec%%:*}; name=${spec##*:}
  cmd="python3 -m memcore verify --backend cupy --device cuda:0 --dtype $dt --profile ci --json $out/$name.json"
  echo "+ $cmd" | tee "$out/$name.txt"
  PYTHONUNBUFFERED=1 $cmd 2>&1 | tee -a "$out/$name.txt"
  echo "exit status: ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
done
