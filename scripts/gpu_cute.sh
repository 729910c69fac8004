#!/usr/bin/env bash
# The CuTe DSL sparse MQA kernel on the GPU machine, in one command from the repo root:
# install nvidia-cutlass-dsl from the carried parts, check it compiles, run the GPU tests, bench it
# beside our Triton kernel and FlashMLA, print a short table last. Every phase is timed and has
# its own time limit; a phase that fails prints its last 150 log lines (the whole log is in $OUT)
# and the script goes on where that makes sense.
#
#   bash scripts/gpu_cute.sh [PARTS_DIR]      (default .cutlass_dsl/g1)
#
# Before it (same warm machine, /tmp survives while warm): an earlier call installed the sglang
# wheelhouse into /tmp/site (FlashMLA comes from its sgl_kernel) and staged the other parts,
# e.g. `source .wheelhouse/install_on_device.sh .wheelhouse && source
# scripts/install_cutlass_dsl.sh .cutlass_dsl/g0` carrying .wheelhouse and .cutlass_dsl/g0.
# Without /tmp/site the tests still run (FlashMLA's column is left out of the bench).
# env: OUT (default /tmp/gpu_cute; the device tool's $OUT brings it back), BENCH_ARGS (default
#      "--quick --cute"), TESTS (default tests/kernels/test_cute_sparse_mqa.py), DEADLINE (default
#      560: seconds after the start by which every phase is cut off, under the device's 600 s)
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS_DIR=${1:-.cutlass_dsl/g1}
OUT=${OUT:-/tmp/gpu_cute}
mkdir -p "$OUT"
T0=$(date +%s)
SUMMARY=()
DEADLINE=${DEADLINE:-560}
phase() {  # phase NAME LIMIT_S CMD...: run, time, keep the log, print its tail (all of it on failure)
  local name=$1 limit=$2 t rc left
  shift 2
  left=$(( DEADLINE - ($(date +%s) - T0) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "== $name skipped: ${left}s left before the deadline"; SUMMARY+=("$(printf '%-12s skipped' "$name")"); return 124
  fi
  echo "== $name (limit ${limit}s, +$(( $(date +%s) - T0 ))s)"
  t=$(date +%s)
  timeout -s KILL "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then tail -n 25 "$OUT/$name.log"; else tail -n 150 "$OUT/$name.log"; fi
  SUMMARY+=("$(printf '%-12s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t ))")")
  return "$rc"
}

# 1) sglang wheelhouse (FlashMLA) from an earlier call, and this package first on the path
if [ -d /tmp/site/sglang ]; then
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "NOTE: /tmp/site/sglang missing (no wheelhouse call before): FlashMLA column skipped"
fi
# 2) cutlass from the carried parts (+ those an earlier call staged)
t=$(date +%s)
# shellcheck source=install_cutlass_dsl.sh
source scripts/install_cutlass_dsl.sh "$PARTS_DIR"
SUMMARY+=("$(printf '%-12s rc=%-3s %4ss' install "$((1 - CUTLASS_DSL_READY))" "$(( $(date +%s) - t ))")")
if [ "$CUTLASS_DSL_READY" != 1 ]; then
  echo "ERROR: nvidia-cutlass-dsl not complete (parts in ${CUTE_PARTS:-/tmp/cutlass_dsl_parts}:"
  ls -la "${CUTE_PARTS:-/tmp/cutlass_dsl_parts}" 2>&1; echo "); carry the missing group"; exit 2
fi
export PYTHONPATH="$PWD:$PYTHONPATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2

# 3) the DSL imports and compiles a tiny kernel (no GPU involved)
phase smoke 90 python scripts/cute_smoke.py
# 4) first light: a few small cases, compile + run time and error printed (a hang or a crash
#    shows here, with its full message, not deep in pytest)
phase first_light 150 python - <<'EOF'
import sys, time; sys.path.insert(0, "tests")
import torch
from sglang_dsv4.kernels.cute_sparse_mqa import CuteSparseMQA
from sparse_mqa_cases import dsv4_case, reference, rel_l2
for h, topk, t, splits in ((64, 512, 1, None), (64, 512, 3, 1), (128, 1024, 3, None)):
    q, (swa, swa_rows, idx), (xc, xrows, xidx, _), sink = dsv4_case(t, h, 32768, topk)
    attn = CuteSparseMQA(h, 512)
    attn.plan(t, 128, topk, num_splits=splits)
    out = torch.full_like(q, float("nan"))
    t0 = time.time()
    attn.run(q, swa, idx, sink, 512**-0.5, extra_kv=xc, extra_indices=xidx, out=out)
    torch.cuda.synchronize()
    ref = reference(q, swa_rows, idx, sink, 512**-0.5, xrows, xidx)
    print(f"h={h} t={t} splits={attn.num_splits}: compile+run {time.time() - t0:.1f} s, "
          f"nan={out.isnan().sum().item()} rel_l2={rel_l2(out.nan_to_num(), ref):.2e} "
          f"counters={attn.counters.tolist()[:4]}", flush=True)
EOF
FL=$?
# 5) the GPU tests (and the CPU compile tests in the same file)
if [ "$FL" = 0 ]; then
  phase tests 240 python -m pytest -q -p no:cacheprovider -rfE "${TESTS:-tests/kernels/test_cute_sparse_mqa.py}"
  # 6) the bench: ours / FlashMLA / CuTe on the same caches
  # shellcheck disable=SC2086
  phase bench 300 python scripts/bench_attention.py ${BENCH_ARGS:---quick --cute} --out "$OUT"
else
  echo "first light failed: tests and bench skipped"
fi

echo
echo "== summary (+$(( $(date +%s) - T0 ))s; logs and bench_attention.json in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
grep -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -1
if [ -f "$OUT/bench.log" ]; then
  sed -n '/^kind model/,/^$/p' "$OUT/bench.log"
fi
