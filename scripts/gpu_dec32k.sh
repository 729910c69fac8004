#!/usr/bin/env bash
# What grows with context in a decode step, on the GPU in one command, from the repo root
# (wheelhouse carried as .wheelhouse):
#
#   bash scripts/gpu_dec32k.sh   install, then
#     1. the GPU tests of the split top-k and the chunked decode metadata (~3-5 min on an H100,
#        most of it Triton compiles): split select == one-program select at 8K / 32K entries
#        (batch 1 and 32, DSV4 shapes), the indexer's other GPU tests (graph replay at batch 3
#        now takes the split select), decode metadata at 8K / 131K-token graph contexts, and the
#        decode / verify kernels against the twin (their small batches take the split select);
#     2. scripts/bench_kv_kernels.py --only idec (~1-3 min): indexer scores / top-k at batch
#        1 / 32 / 128 x context 4K / 32K / 128K; per row the select plan() picked (s_topk, with
#        its range count) next to the one-program select (s_topk_one), same shapes, same run.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_dec32k), BENCH=0
#      skips step 2. Exit status: the tests', else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
WH=${WHEELHOUSE:-.wheelhouse}
OUT=${OUT:-/tmp/gpu_dec32k}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
# shellcheck disable=SC1091
source "$WH/install_on_device.sh" "$WH" > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH="$PWD:$PYTHONPATH"  # this checkout's package, the wheelhouse's sglang
echo "installed in $(( $(date +%s) - start )) s"
python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_indexer.py \
    tests/kernels/test_decode_meta.py tests/attention/test_decode_kernels.py \
    tests/attention/test_verify_kernels.py 2>&1 | tail -n 30
rc=${PIPESTATUS[0]}
echo "tests exit $rc at $(( $(date +%s) - start )) s"
if [ "${BENCH:-1}" = 1 ]; then
    python3 scripts/bench_kv_kernels.py --only idec --reps 30 --out "$OUT" \
        > "$OUT/bench_idec.txt" 2>&1
    brc=$?
    grep -A 40 "copy ceiling" "$OUT/bench_idec.txt" || tail -n 40 "$OUT/bench_idec.txt"
    echo "bench exit $brc at $(( $(date +%s) - start )) s"
    [ "$rc" = 0 ] && rc=$brc
fi
exit "$rc"
