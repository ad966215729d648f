#!/usr/bin/env bash
# Issue 14 item 5: the SAB paper's copy task at T = 100 (Table 2) and its transfer test
# (Table 6), four runs trained at once on ONE GPU through memcore train's compiled torch path
# (memcore.train.fast_torch: on a CUDA device it is chosen by default), in time slices:
#   bptt         configs/copy_bptt_t100.toml          LSTM, full BPTT
#   tbptt        configs/copy_tbptt_t100.toml         LSTM, truncated BPTT, k_trunc 5
#   sab          configs/copy_sab_t100.toml           SAB k_trunc 5 k_top 5, memcore semantics
#   sab_release  configs/copy_sab_t100_release.toml   SAB, release-compatible mode
# Usage (repository root; memcore need not be installed):
#   bash scripts/gpu_issue14_repro.sh [BUDGET_S] [RESUME_TARBALL]
#   BUDGET_S        training seconds in this call (default 420). Then every run gets SIGINT,
#                   which memcore train answers by checkpointing its last finished step (exit
#                   130); the next call resumes it (--resume). Keep BUDGET_S + the transfer
#                   evaluation + ~60 s start-up under the device's per-call limit.
#   RESUME_TARBALL  runs.tar.gz from an earlier call (carry it back in the repository tree,
#                   e.g. results/sab_repro/runs.tar.gz): unpacked into ROOT before training.
# Env: EVAL=1   also evaluate every LSTM/SAB checkpoint at T = 200 .. 5000 (Table 6;
#               scripts/sab_transfer_eval.py), ~1-2 min on an H100;
#      ROOT     output folder (default results/sab_repro); DEVICE (default cuda:0);
#      CONFIG_DIR where the four configs are (default configs; the CPU test uses tiny ones);
#      EVAL_T   the transfer lengths (default "200 300 400 2000 5000"); EVAL_SIZE (512);
#      RUNS     which runs to train (default "bptt tbptt sab sab_release").
# Writes ROOT/runs/<name>/ (checkpoint.npz, results.json, curves.png, transfer.json),
# ROOT/logs/<name>.log, ROOT/README.md (scripts/sab_repro_table.py) and, when $OUT is set
# (the device machine returns at most 8 files from it), $OUT/runs.tar.gz, $OUT/logs.tar.gz
# and $OUT/README.md.
set -uo pipefail
budget=${1:-420}
resume_from=${2:-}
root=${ROOT:-results/sab_repro}
device=${DEVICE:-cuda:0}
cfgdir=${CONFIG_DIR:-configs}
eval_t=${EVAL_T:-200 300 400 2000 5000}
[ -f scripts/device_shim.sh ] && ! python3 -c "import memcore.train" 2>/dev/null && source scripts/device_shim.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$root/runs" "$root/logs"
if [ -n "$resume_from" ]; then
  tar xzf "$resume_from" -C "$root" || { echo "cannot unpack $resume_from"; exit 2; }
fi
names=${RUNS:-bptt tbptt sab sab_release}
declare -A cfg=([bptt]=copy_bptt_t100 [tbptt]=copy_tbptt_t100 [sab]=copy_sab_t100 \
  [sab_release]=copy_sab_t100_release)
{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null
} >> "$root/logs/versions.log" 2>&1
pids=()
for name in $names; do
  dir="$root/runs/$name"
  flag=""; [ -f "$dir/checkpoint.npz" ] && flag="--resume"
  cmd=(python3 -m memcore train "$cfgdir/${cfg[$name]}.toml" --backend torch --device "$device"
       --out "$dir" --quiet $flag)
  echo "+ ${cmd[*]}  (SIGINT after ${budget}s)" | tee -a "$root/logs/$name.log"
  ( timeout -s INT -k 120 "$budget" "${cmd[@]}" >> "$root/logs/$name.log" 2>&1
    echo "$name exit status: $?" | tee -a "$root/logs/$name.log" ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
if [ "${EVAL:-0}" = 1 ]; then
  dirs=(); for name in bptt sab sab_release; do [ -d "$root/runs/$name" ] && dirs+=("$root/runs/$name"); done
  python3 scripts/sab_transfer_eval.py "${dirs[@]}" --T $eval_t --device "$device" \
    --size "${EVAL_SIZE:-512}" 2>&1 | tee -a "$root/logs/transfer.log"
fi
python3 scripts/sab_repro_table.py "$root/runs" --out "$root/README.md" > /dev/null
for name in $names; do  # the step each run reached, for the lead's note
  python3 -c "import json; r=json.load(open('$root/runs/$name/results.json')); print('$name', r['steps_done'], r['final_eval'])" 2>/dev/null || echo "$name: no results yet"
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/runs.tar.gz" -C "$root" runs
  tar czf "$OUT/logs.tar.gz" -C "$root" logs
  cp "$root/README.md" "$OUT/README.md"
fi
