#!/usr/bin/env bash
# The extend indexer's top-k launches (issue 14), on the GPU in one command, from the repo root
# (wheelhouse carried as .wheelhouse):
#
#   bash scripts/gpu_topk.sh   install, then
#     1. the GPU tests of the select candidates (~1-2 min on an H100, most of it Triton
#        compiles): every kernels.topk_shapes candidate at the last 8192-query chunk of 4K-64K
#        prompts equals the default select bit for bit (Gaussian, tied, NaN / -0.0 scores), the
#        rows select in whole extend runs at Flash dims against the reference;
#     2. scripts/bench_kv_kernels.py --only tsweep,ipre (~1-2 min): each candidate's select
#        alone at those chunks (us, picks == default), the fastest per prompt printed as
#        topk_shapes.MEASURED rows to paste; then the served extend indexer as plan() picks it.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_topk), BENCH=0
#      skips step 2. Exit status: the tests', else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_topk || exit 1  # sets WH, OUT, start
python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_topk_rows.py \
    tests/kernels/test_indexer_extend.py 2>&1 | tail -n 30
rc=${PIPESTATUS[0]}
echo "tests exit $rc at $(( $(date +%s) - start )) s"
if [ "${BENCH:-1}" = 1 ]; then
    python3 scripts/bench_kv_kernels.py --only tsweep,ipre --reps 30 --out "$OUT" \
        > "$OUT/bench_topk.txt" 2>&1
    brc=$?
    grep -A 5 -- "--only tsweep" "$OUT/bench_topk.txt"  # the MEASURED rows to paste
    grep -A 40 "copy ceiling" "$OUT/bench_topk.txt" || tail -n 60 "$OUT/bench_topk.txt"
    echo "bench exit $brc at $(( $(date +%s) - start )) s"
    [ "$rc" = 0 ] && rc=$brc
fi
exit "$rc"
