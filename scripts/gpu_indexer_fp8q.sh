#!/usr/bin/env bash
# Issue 14, e4m3 indexer queries (branch fp8q) on one GPU: the GPU tests of the indexer kernels
# and of the paths that run them (extend wrappers, decode / verify kernels), then the served
# extend indexer (`bench_kv_kernels.py --only ipre`) on this tree and, when `.base` holds the
# tree before (`git archive main | tar -x -C .base`), on it in the same call; then `--only idec`.
#   bash scripts/gpu_indexer_fp8q.sh      (TT / TB / TD: the steps' time limits, s)
set -uo pipefail
T0=$(date +%s); step(){ echo "[$(( $(date +%s)-T0 )) s] $*"; }
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ ! -d /tmp/site/sglang ]; then
  source .wheelhouse/install_on_device.sh .wheelhouse > /tmp/install.log 2>&1 || { tail -30 /tmp/install.log; exit 2; }
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
step installed
timeout "${TT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
  tests/kernels/test_indexer_extend.py tests/kernels/test_indexer.py tests/attention/test_wrappers.py \
  tests/attention/test_decode_kernels.py tests/attention/test_verify_kernels.py > "$OUTD/gpu_tests.log" 2>&1
step "gpu tests rc=$?: $(tail -n 1 "$OUTD/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUTD/gpu_tests.log" | head -20
timeout "${TB:-90}" python3 scripts/bench_kv_kernels.py --only ipre --reps 30 --out "$OUTD" > "$OUTD/bench_ipre.txt" 2>&1
step "ipre rc=$?"; tail -n 12 "$OUTD/bench_ipre.txt"
if [ -d .base/sglang_dsv4 ]; then
  mkdir -p "$OUTD/base"
  PYTHONPATH=$PWD/.base:/tmp/site timeout "${TB:-90}" python3 .base/scripts/bench_kv_kernels.py --only ipre \
    --reps 30 --out "$OUTD/base" > "$OUTD/bench_ipre_base.txt" 2>&1
  step "ipre base rc=$?"; tail -n 12 "$OUTD/bench_ipre_base.txt"
fi
timeout "${TD:-100}" python3 scripts/bench_kv_kernels.py --only idec --reps 30 --out "$OUTD" > "$OUTD/bench_idec.txt" 2>&1
step "idec rc=$?"; tail -n 30 "$OUTD/bench_idec.txt"
