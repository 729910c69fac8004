#!/usr/bin/env bash
# mHC's decode tail (issue 13: _hc_kernel at 1-8 tokens, _maps_collapse_kernel above) before /
# after on one GPU in one command, from the repo root (wheelhouse carried as .wheelhouse):
#
#   bash scripts/gpu_mhcdec.sh   install, then
#     1. scripts/bench_ops.py --only hc. at T 1 / 32 / 128, Flash dims: from .base (the old
#        code: `git archive main sglang_dsv4 scripts` extracted there, made here when missing
#        and git is at hand; BASE_REF picks another ref) then from this checkout (~30 s);
#     2. scripts/mhc_bits.py: the same inputs through both checkouts' hc_fused, compared bit
#        for bit (T 1 / 8 / 32 / 128, bf16 / fp32, pre / post+pre / head; ~15 s);
#     3. scripts/tune_hc_route.py at T 1 / 8: the one-token form at 4 and 8 warps (FMA_WARPS,
#        8 measured best with the old tail) and the GEMM form, this checkout (~20 s; TUNE=0
#        skips);
#     4. the mHC GPU tests of tests/kernels/test_mhc.py, tests/kernels/test_mhc_gemm.py,
#        tests/ops/test_mhc.py (~1-3 min, most of it Triton compiles; TESTS=0 skips).
#
# env: WHEELHOUSE (default .wheelhouse), OUT (default /tmp/gpu_mhcdec), BASE_REF (default
#      main), TUNE=0, TESTS=0. Exit status: the tests', else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_mhcdec || exit 1  # sets WH, OUT, start; this checkout first on PYTHONPATH
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
if [ ! -d .base ] && git rev-parse --verify -q "${BASE_REF:-main}" > /dev/null 2>&1; then
    mkdir -p .base && git archive "${BASE_REF:-main}" sglang_dsv4 scripts | tar -x -C .base
fi
bench=(--config configs/dsv4-flash-dims.json --tokens 1,32,128 --impls triton --only hc.)
rc=0
if [ -d .base/sglang_dsv4 ]; then
    PYTHONPATH="$PWD/.base:$PYTHONPATH" python3 .base/scripts/bench_ops.py "${bench[@]}" \
        --out "$OUT/base" > "$OUT/bench_base.txt" 2>&1
    stamp "baseline .base (exit $?):"; grep -A 12 "^op " "$OUT/bench_base.txt" \
        || tail -n 20 "$OUT/bench_base.txt"
    PYTHONPATH="$PWD/.base:$PYTHONPATH" python3 scripts/mhc_bits.py save "$OUT/base.pt" \
        > "$OUT/bits_base.txt" 2>&1 || tail -n 20 "$OUT/bits_base.txt"
else
    stamp "no .base (and no git ref ${BASE_REF:-main} here): no baseline"
fi
python3 scripts/bench_ops.py "${bench[@]}" --out "$OUT" > "$OUT/bench.txt" 2>&1
rc=$?
stamp "this checkout (exit $rc):"; grep -A 12 "^op " "$OUT/bench.txt" || tail -n 20 "$OUT/bench.txt"
python3 scripts/mhc_bits.py save "$OUT/new.pt" > "$OUT/bits_new.txt" 2>&1 \
    || tail -n 20 "$OUT/bits_new.txt"
if [ -f "$OUT/base.pt" ] && [ -f "$OUT/new.pt" ]; then
    python3 scripts/mhc_bits.py compare "$OUT/base.pt" "$OUT/new.pt"
    stamp "bits compared"
fi
if [ "${TUNE:-1}" = 1 ]; then
    python3 scripts/tune_hc_route.py --tokens 1,8 --programs 264 --out "$OUT" \
        > "$OUT/tune.txt" 2>&1
    stamp "tune_hc_route (exit $?):"; tail -n 8 "$OUT/tune.txt"
fi
if [ "${TESTS:-1}" = 1 ]; then
    python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_mhc.py \
        tests/kernels/test_mhc_gemm.py tests/ops/test_mhc.py 2>&1 | tail -n 30
    trc=${PIPESTATUS[0]}
    stamp "tests exit $trc"
    [ "$trc" != 0 ] && rc=$trc
fi
exit "$rc"
