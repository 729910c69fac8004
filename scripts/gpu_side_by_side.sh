#!/usr/bin/env bash
# The side-by-side benchmark on the GPU machine: ONE device call per invocation, from the repo root.
#
#   bash scripts/gpu_side_by_side.sh IMPL [scripts/side_by_side.py run options]
#     IMPL: ours | native | ours,native (in that order, one server after the other)
#     e.g.  bash scripts/gpu_side_by_side.sh ours --cells 4096x1,4096x32,4096x128 --repeats 3
#
# Call 1 carries .wheelhouse: installs it and this package into /tmp/site and builds the
# Flash-dims bf16 checkpoint into /tmp/fd (~60 s). Later calls on the same warm machine (it stays
# warm ~30 s after a call; /tmp survives) carry nothing for `ours`, and for `native` the two
# files of ../shared/device/build_native_extra.sh's output: .native/dsv4_native_extra.tar.xz and
# .native/install_native_extra.sh (DeepGEMM + TileLang; unpacked once, reused by later calls).
# Each server's JSON is kept in /tmp/sbs for later calls and copied to $OUT; the merged table
# over every JSON in /tmp/sbs (ours / native ratios, capacity) is printed last and written to
# $OUT/side_by_side.{md,json}. Exit status: 2 set-up failed, 1 a server or a run failed.
#
# env: WHEELHOUSE (.wheelhouse), NATIVE (.native), SITE (/tmp/site), WORK (/tmp/fd),
#      SBS (/tmp/sbs), MODEL (default $WORK/ckpt-bf16, built when missing),
#      SKIP_INSTALL=1 (use the current Python environment as is: CPU dry runs)
set -uo pipefail
cd "$(dirname "$0")/.."
SBS_T0=$(date +%s)
SBS_COMMAND="bash scripts/gpu_side_by_side.sh $(python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@")"
export SBS_T0 SBS_COMMAND PYTHONUNBUFFERED=1
IMPL=${1:?usage: gpu_side_by_side.sh ours|native|ours,native [side_by_side.py run options]}
shift
WH=${WHEELHOUSE:-.wheelhouse}
NX=${NATIVE:-.native}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/fd}
SBS=${SBS:-/tmp/sbs}
MODEL=${MODEL:-$WORK/ckpt-bf16}
RESULTS=${OUT:-$SBS}
mkdir -p "$SBS" "$RESULTS"
log() { echo "[$(( $(date +%s) - SBS_T0 )) s] $*"; }
die() { echo "ERROR: $*" >&2; exit 2; }
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh

# 1. sglang + this package in $SITE
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    log "SKIP_INSTALL=1: current environment, package from $PWD"
else
    site_install "$SBS"
fi

# 2. the native path's packages (DeepGEMM, TileLang, libz3)
if [[ ",$IMPL," == *",native,"* ]]; then
    native_packages "$SBS"
fi

# 3. the checkpoint (seeded: every call and both servers read the same weights)
if [ ! -f "$MODEL/config.json" ]; then
    [ "$MODEL" = "$WORK/ckpt-bf16" ] || die "MODEL=$MODEL has no config.json"
    python3 scripts/side_by_side.py build --work "$WORK" > "$SBS/build.log" 2>&1 \
        || { tail -n 40 "$SBS/build.log"; die "checkpoint build failed"; }
    log "$(tail -n 1 "$SBS/build.log")"
fi

# 4. measure, then the merged table over everything measured on this machine
python3 scripts/side_by_side.py run --impl "$IMPL" --model-path "$MODEL" --out "$SBS" "$@"
rc=$?
if [ "$RESULTS" != "$SBS" ]; then
    cp "$SBS"/sbs_*.json "$SBS"/*.jsonl "$RESULTS"/ 2>/dev/null
    for f in "$SBS"/*.log; do tail -c 300000 "$f" > "$RESULTS/$(basename "$f")"; done
fi
echo
python3 scripts/perf_table.py "$SBS"/sbs_*.json --json "$RESULTS/side_by_side.json" \
    --md "$RESULTS/side_by_side.md" || rc=1
log "done, exit $rc"
exit $rc
