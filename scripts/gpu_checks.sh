#!/usr/bin/env bash
# Several branch GPU checks in ONE device call, from the repo root (carry .wheelhouse, and .base
# for xlayer's before/after: `rm -rf .base && mkdir .base && git archive <base commit> | tar -x
# -C .base`): the wheelhouse installed once, then each step's script in order while the call's
# time lasts (a step starts only with MIN_S seconds left; each script bounds its own parts).
#
#   STEPS="xgather xmoe xlayer" LIMIT=560 bash scripts/gpu_checks.sh
#
# A step NAME runs scripts/gpu_NAME.sh with OUT=$OUT/NAME; its output goes to $OUT/NAME.log and
# its last 25 lines are printed; a summary table (step, exit status, seconds) comes last.
# env: STEPS (default "xgather xmoe xlayer"), LIMIT (s from the start, default 560), MIN_S (120),
#      WHEELHOUSE (.wheelhouse), OUT (/tmp/gpu_checks)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
LIMIT=${LIMIT:-560}
MIN_S=${MIN_S:-120}
mkdir -p "$OUT"
T0=$(date +%s)
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_checks_install || exit 1
export SITE_READY=1
summary=()
for step in ${STEPS:-xgather xmoe xlayer}; do
    left=$(( LIMIT - $(date +%s) + T0 ))
    if [ "$left" -lt "$MIN_S" ]; then
        summary+=("$step skipped ${left}s-left"); continue
    fi
    t=$(date +%s)
    OUT="$OUT/$step" timeout "$left" bash "scripts/gpu_$step.sh" > "$OUT/$step.log" 2>&1
    rc=$?
    echo "== $step (exit $rc, $(( $(date +%s) - t )) s)"; tail -n 25 "$OUT/$step.log"
    summary+=("$step $rc $(( $(date +%s) - t ))s")
done
echo; echo "step exit seconds"
printf '%s\n' "${summary[@]}"
