#!/usr/bin/env bash
# The sorted (prefill) MoE form on the GPU in one command, from the repo root (wheelhouse carried
# as .wheelhouse):
#
#   bash scripts/gpu_moe_sorted.sh   install, then
#     1. scripts/bench_moe.py --sorted (~60-90 s on an H100): each sorted kernel at every
#        candidate tile of kernels/moe_sorted_tiles.py, T 4096 / 8192 / 16384, bf16 and FP8, the
#        slot sum (torch vs kernels.slot_sum), whole calls vs SGLang's fused_experts; prints the table and
#        the MEASURED rows to paste last;
#     2. the sorted form's GPU tests (~2-3 min): every tile against the twin at an 8K-token
#        prefill, Flash dims in every format, CUDA-graph replay, the sm_90 compile check.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_moe_sorted),
#      TESTS=0 skips step 2. Exit status: the bench's, else the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_moe_sorted || exit 1  # sets WH, OUT, start
python3 scripts/bench_moe.py --sorted --out "$OUT/bench_moe_sorted.json" \
    > "$OUT/bench_moe_sorted.txt" 2>&1
rc=$?
grep -A 200 -m 1 "^bf16: us" "$OUT/bench_moe_sorted.txt" || tail -n 40 "$OUT/bench_moe_sorted.txt"
echo "bench exit $rc at $(( $(date +%s) - start )) s"
if [ "${TESTS:-1}" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_moe_sorted_tiles.py \
        tests/kernels/test_moe_experts.py -k "sorted or every_tile" 2>&1 | tail -n 30
    trc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] && rc=$trc
    echo "tests exit $trc at $(( $(date +%s) - start )) s"
fi
exit "$rc"
