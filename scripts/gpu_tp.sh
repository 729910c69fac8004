#!/usr/bin/env bash
# TP1 vs TP-N on a multi-GPU machine, one command from the repo root (wheelhouse carried as
# .wheelhouse, as for scripts/gpu_e2e.sh):
#
#   bash scripts/gpu_tp.sh            install, then scripts/gpu_tp.py --tp 1 2: a Flash-dims DSV4
#                                     with 8 layers (bf16, random) served at TP1 and TP2 on the
#                                     same checkpoint: KL(TP2 || TP1), greedy agreement, prefill
#                                     and decode throughput (bench_one_batch_server, 2K input,
#                                     batch 1 / 32); ~8 min on 2 H100s.
#   bash scripts/gpu_tp.sh 1 4        the TP sizes to run (the first must be 1).
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_tp). Exit status 1
# if a gate fails (KL mean <= 0.01 and greedy agreement >= 0.9 per prompt).
set -uo pipefail
cd "$(dirname "$0")/.."
WH=${WHEELHOUSE:-.wheelhouse}
OUT=${OUT:-/tmp/gpu_tp}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
start=$(date +%s)
# shellcheck disable=SC1091
source "$WH/install_on_device.sh" "$WH" > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation --target "${SITE:-/tmp/site}" . \
    >> "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
echo "installed in $(( $(date +%s) - start )) s; $(nvidia-smi -L | wc -l) GPUs"
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(1 2)
python3 scripts/gpu_tp.py --work /tmp/tp_flash_dims --tp "${sizes[@]}" > "$OUT/gpu_tp.txt" 2>&1
rc=$?
grep -A 40 "^== Flash-dims" "$OUT/gpu_tp.txt" || tail -n 40 "$OUT/gpu_tp.txt"
echo "total $(( $(date +%s) - start )) s, exit $rc"
exit $rc
