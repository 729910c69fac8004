#!/usr/bin/env bash
# The extend plan's host work per step (issue 14: TTFT), this tree against main, on the GPU in one
# command from the repo root (carry .wheelhouse and .base = `git archive main` extracted there:
# `rm -rf .base && mkdir .base && git archive main | tar -x -C .base`):
#
#   bash scripts/gpu_xhost.sh   install (~20 s), then (~60-90 s on an H100):
#     1. the GPU tests of the plan's syncs and copies: tests/attention/test_plan.py,
#        test_plan_facts.py, tests/mem/test_h2d.py (none may synchronize on the host-slots path);
#     2. scripts/bench_plan_host.py --device cuda at Flash dims (64 heads of 512, SWA / CSA /
#        HCA / CSA: FlashMLA's extend plans serve, as in the profiled server) and a 32768-token
#        context, extend 2x4096, 16x4096 (fresh prompts) and 1x8192+24576 (the last chunk of a
#        32K prompt), on this tree and on .base (the same bench script, the package from
#        PYTHONPATH): host us per plan,
#        torch ops (launches), host ops, host -> device copies and bytes, syncs; plus cProfile's
#        top functions of extend 2x4096 on each;
#     3. FlashMLA's sparse prefill over the plan's workspace vs ours at Flash dims
#        (tests/attention/test_extend_choice.py::test_gpu_flashmla_extend_equals_ours: its index
#        lists are built from the plan's window ids now).
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_xhost), REPS (20).
# Exit status: the tests', else the benches'.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_xhost || exit 1  # sets WH, OUT, start; this checkout first on PYTHONPATH
[ -d .base/sglang_dsv4 ] || { echo "no .base/sglang_dsv4: carry .base (git archive main)"; exit 1; }
python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/attention/test_plan.py \
    tests/attention/test_plan_facts.py tests/mem/test_h2d.py 2>&1 | tail -n 15
rc=${PIPESTATUS[0]}
echo "plan tests exit $rc at $(( $(date +%s) - start )) s"
bench() {  # NAME PYTHONPATH-FIRST
    PYTHONPATH="$2:$PYTHONPATH" python3 scripts/bench_plan_host.py --device cuda \
        --config configs/dsv4-flash-dims.json --reps "${REPS:-20}" --contexts 32768 \
        --decode-bs 1 --graph-nodes "" \
        --extend 2x4096,16x4096,1x8192+24576 --profile "extend 2x4096" --out "$OUT/$1" \
        > "$OUT/bench_$1.txt" 2>&1
    local brc=$?
    echo "== $1 ($2), exit $brc at $(( $(date +%s) - start )) s"
    grep -E "^(case|extend|decode)" "$OUT/bench_$1.txt"
    grep -A 22 "Ordered by" "$OUT/bench_$1.txt" | cut -c 1-150
    return $brc
}
mkdir -p "$OUT/ours" "$OUT/base"
bench ours "$PWD"
b1=$?
bench base "$PWD/.base"
b2=$?
timeout 60 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu \
    tests/attention/test_extend_choice.py::test_gpu_flashmla_extend_equals_ours 2>&1 | tail -n 8
frc=${PIPESTATUS[0]}
echo "flashmla test exit $frc at $(( $(date +%s) - start )) s"
[ "$rc" = 0 ] && rc=$frc
[ "$rc" = 0 ] && rc=$b1
[ "$rc" = 0 ] && rc=$b2
exit "$rc"
