#!/usr/bin/env bash
# The sorted MoE form's pair grouping (issue 13: kernels/moe_group.py replaces the cat / sort /
# searchsorted / cast launches) on the GPU in one command, from the repo root (wheelhouse
# carried as .wheelhouse):
#
#   bash scripts/gpu_moegroup.sh   install, then
#     1. the GPU tests of tests/kernels/test_moe_group.py and tests/perf/test_timing.py (the
#        bench's kernel count) (~1-2 min on an H100, most of it Triton compiles): order /
#        offsets / weights bit for bit against the torch ops at T 1 / 32 / 128 / 8192,
#        R 17 / 256 / 257 / 384 / 385, k 2 / 6 / 8, every chunk size; CUDA-graph replay on
#        new routing, no host sync; the whole sorted MoE call (bf16, FP8) with the kernel
#        grouping has the bits of the torch grouping's;
#     2. scripts/bench_moe.py --group (~20 s): the grouping alone, torch ops vs the kernel (us,
#        kernels per call, same bits) at the served / Flash / Pro routings, T 1 / 32 / 128 /
#        8192, each chunk size above one program; the fastest chunk per pair count last;
#     3. with SORTED=1 (~2-3 min more): the sorted form's GPU tests of test_moe_experts.py.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_moegroup), BENCH=0
#      skips step 2, SORTED=1 adds step 3. Exit status: the tests', else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_moegroup || exit 1  # sets WH, OUT, start
python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_moe_group.py \
    tests/perf/test_timing.py 2>&1 \
    | tail -n 30
rc=${PIPESTATUS[0]}
echo "tests exit $rc at $(( $(date +%s) - start )) s"
if [ "${BENCH:-1}" = 1 ]; then
    python3 scripts/bench_moe.py --group --out "$OUT/bench_moe_group.json" \
        > "$OUT/bench_moe_group.txt" 2>&1
    brc=$?
    grep -A 40 "^grouping: us" "$OUT/bench_moe_group.txt" || tail -n 40 "$OUT/bench_moe_group.txt"
    echo "bench exit $brc at $(( $(date +%s) - start )) s"
    [ "$rc" = 0 ] && rc=$brc
fi
if [ "${SORTED:-0}" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_moe_experts.py \
        -k sorted 2>&1 | tail -n 30
    src=${PIPESTATUS[0]}
    echo "sorted-form tests exit $src at $(( $(date +%s) - start )) s"
    [ "$rc" = 0 ] && rc=$src
fi
exit "$rc"
