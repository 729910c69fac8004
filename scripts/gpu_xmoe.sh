#!/usr/bin/env bash
# The MoE layer's shared expert (a bank of its own next to FP4 routed experts) without launches of
# its own (issues 13/14, branch xmoe): in the slot form one more program per token in the routed
# kernels (3 launches per layer at decode, was 6); in the sorted form its identity grouping a
# constexpr of the GEMM kernels (no grouping launch, no slot sum of its own) and its rows added in
# the routed slot sum (no torch add); the banks' kernel operands made once.
# One command from the repo root (wheelhouse carried as .wheelhouse), <= ~300 s on an H100:
#
#   bash scripts/gpu_xmoe.sh   install, then
#     1. the GPU tests (~2-3 min, most of it Triton compiles): tests/ops/test_moe.py (the
#        Flash-dims served layer, MXFP4 routed + FP8 shared bank, hash and scored, T 1 / 4 / 32 /
#        128 / 1024 / 8192: the bits of main's path, 3 / 7 / 8 launches and no torch kernel,
#        CUDA-graph replay on new tokens = eager; the bf16 layer against the fp32 twin),
#        tests/kernels/test_slot_sum.py (the add rows' bits against torch), and the graph-replay
#        and small-batch tests of tests/kernels/test_moe_experts.py;
#     2. scripts/bench_moe.py --count (~30-60 s): per MoE forward of that layer at T 1 / 32 /
#        128 / 8192, Triton launches and torch ops, CUDA kernels (profiler) and us per call
#        (graph replay) after and before (main's path: shared bank's own grouping + slot sum +
#        torch add), same bits or not; the table last.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_xmoe), TESTS=0 skips
#      step 1. Exit status: the tests', else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_xmoe || exit 1 # sets WH, OUT, start
rc=0
if [ "${TESTS:-1}" = 1 ]; then
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/ops/test_moe.py \
        tests/kernels/test_slot_sum.py tests/kernels/test_moe_experts.py \
        -k "not test_experts_gpu_flash_dims and not every_tile and not every_swept" 2>&1 \
        | tail -n 30
    rc=${PIPESTATUS[0]}
    echo "tests exit $rc at $(($(date +%s) - start)) s"
fi
timeout 120 python3 scripts/bench_moe.py --count --out "$OUT/bench_moe_count.json" \
    > "$OUT/bench_moe_count.txt" 2>&1
brc=$?
grep -A 30 "^MoE forward" "$OUT/bench_moe_count.txt" || tail -n 40 "$OUT/bench_moe_count.txt"
echo "bench exit $brc at $(($(date +%s) - start)) s"
[ "$rc" = 0 ] && rc=$brc
exit "$rc"
