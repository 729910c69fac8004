#!/usr/bin/env bash
# mHC's tiled (prefill) pass (kernels/mhc_gemm.py) on the GPU in one command, from the repo root
# (wheelhouse carried as .wheelhouse):
#
#   bash scripts/gpu_mhc_prefill.sh   install, then
#     1. scripts/bench_ops.py --only hc. at T 1 / 32 / 128 / 300 / 8192, Flash dims (~1-2 min);
#        with BASE (a checkout of the old code, e.g. main carried as .base) the same bench from
#        it first, in the same lease, for the before / after table;
#     2. the mHC GPU tests (~3-4 min): prefill shapes (T 300 / 8192, d 4096) against the twin,
#        bf16 streams bit-exact to the in-order rounding, hc_post alone = the fused pass; then
#        kernels/test_mhc.py's decode-to-1000-token grid and CUDA-graph replays, ops/test_mhc.py;
#     3. scripts/tune_hc_tiles.py (~2 min): tile / step / warps / programs of the tiled pass.
#
# Needs sglang in $SITE (/tmp/site: installed by an earlier call from the wheelhouse) or a
# carried .wheelhouse; (re)installs THIS checkout's package into $SITE (scripts/device_setup.sh).
# env: WHEELHOUSE (default .wheelhouse), SITE, OUT (logs + JSON, default /tmp/gpu_mhc_prefill),
#      BASE (unset: no baseline), TESTS=0 / TUNE=0 skip steps 2 / 3.
# Exit status: the bench's, else the tests', else the sweep's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WH=${WHEELHOUSE:-.wheelhouse}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu_mhc_prefill}
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
die() { echo "ERROR: $*" >&2; exit 2; }
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
site_install "$OUT"
bench=(--config configs/dsv4-flash-dims.json --tokens 1,32,128,300,8192 --impls triton
       --only hc.)
if [ -n "${BASE:-}" ]; then
    (cd "$BASE" && PYTHONPATH="$PWD:$PYTHONPATH" python3 scripts/bench_ops.py "${bench[@]}" \
        --out "$OUT/base") > "$OUT/bench_base.txt" 2>&1
    log "baseline ($BASE, exit $?):"; grep -A 20 "^op " "$OUT/bench_base.txt"
fi
python3 scripts/bench_ops.py "${bench[@]}" --out "$OUT" > "$OUT/bench.txt" 2>&1
rc=$?
log "this checkout (exit $rc):"; grep -A 20 "^op " "$OUT/bench.txt" || tail -n 30 "$OUT/bench.txt"
if [ "${TESTS:-1}" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_mhc_gemm.py \
        tests/kernels/test_mhc.py tests/ops/test_mhc.py 2>&1 | tail -n 30
    trc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] && rc=$trc
    log "tests exit $trc"
fi
if [ "${TUNE:-1}" = 1 ]; then
    python3 scripts/tune_hc_tiles.py --out "$OUT" > "$OUT/tune.txt" 2>&1
    urc=$?
    [ "$rc" = 0 ] && rc=$urc
    grep -A 20 "best per op" "$OUT/tune.txt" || tail -n 30 "$OUT/tune.txt"
    log "sweep exit $urc"
fi
exit "$rc"
