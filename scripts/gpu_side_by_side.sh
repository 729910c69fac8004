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

# 1. sglang + this package in $SITE
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    log "SKIP_INSTALL=1: current environment, package from $PWD"
else
    if [ -f "$WH/install_on_device.sh" ]; then
        # shellcheck disable=SC1091
        source "$WH/install_on_device.sh" "$WH" > "$SBS/install.log" 2>&1 \
            || { cat "$SBS/install.log"; die "wheelhouse install failed"; }
        log "wheelhouse installed into $SITE"
    elif [ -d "$SITE/sglang" ]; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        log "no wheelhouse carried: reusing $SITE from an earlier call"
    else
        die "no $WH carried and $SITE/sglang missing: not the warm machine of call 1 (run call 1 again, carrying .wheelhouse)"
    fi
    python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target "$SITE" . \
        >> "$SBS/install.log" 2>&1 || { tail -n 30 "$SBS/install.log"; die "pip install of this package failed"; }
fi

# 2. the native path's packages (DeepGEMM, TileLang, libz3)
if [[ ",$IMPL," == *",native,"* ]]; then
    if [ -f "$NX/install_native_extra.sh" ] && [ -f "$NX/dsv4_native_extra.tar.xz" ]; then
        # shellcheck disable=SC1091
        source "$NX/install_native_extra.sh" "$NX" > "$SBS/native_install.log" 2>&1 \
            || { cat "$SBS/native_install.log"; die "native packages did not install"; }
        log "native packages unpacked into $SITE"
    elif [ -d "$SITE/deep_gemm" ] && [ -d "$SITE/tilelang" ]; then
        # unpacked by an earlier call on this machine: set what install_native_extra.sh sets
        export CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
        export LD_LIBRARY_PATH="/tmp/z3lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export DG_JIT_CACHE_DIR=/tmp/jitcache/deep_gemm TILELANG_CACHE_DIR=/tmp/jitcache/tilelang
        export TVM_FFI_CACHE_DIR=/tmp/jitcache/tvm-ffi
        log "native packages already in $SITE (earlier call)"
    else
        die "native needs DeepGEMM / TileLang: carry .native/dsv4_native_extra.tar.xz and .native/install_native_extra.sh (bash ../shared/device/build_native_extra.sh .native)"
    fi
    python3 -c "import deep_gemm, tilelang" > "$SBS/native_import.log" 2>&1 \
        || { tail -n 30 "$SBS/native_import.log"; die "deep_gemm / tilelang do not import"; }
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
