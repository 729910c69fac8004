#!/usr/bin/env bash
# Issue 13's decode gap pinned down on the GPU in ONE device call, from the repo root:
#
#   bash scripts/gpu_dgap.sh [ours|native|ours,native] [scripts/dgap.py options]
#
# Installs the carried .wheelhouse and this package into $SITE (the package's dist-info carries
# the `dsv4_hosttrace` entry point the trace needs: a PYTHONPATH checkout does not), builds the
# Flash-dims bf16 checkpoint into $WORK when missing (~60 s; gpu_side_by_side.sh's, reused when
# present), then per IMPL: scripts/dgap.py starts the server (the side-by-side server args,
# context 33792) with SGLANG_DSV4_HOST_TRACE set, decodes 200 tokens after a 32768-token prompt
# at batch 1 (streamed), and prints per decode step the host us of every scheduler-loop phase
# (run_batch, ForwardBatch.init_new, load_batch, fill_from, our replay prep, the graph launch,
# process_batch_result, the time blocked on the GPU ...) and the GPU-mark us (idle before the
# step, copy -> graph gap, the graph, sampling), the decode graphs' node census, then profiles
# 8 steps of a second request (with_stack) for cudaGraphLaunch's host us under CUPTI.
# ours: ~70-90 s server start + ~15 s of requests and trace. native (needs .native, see
# gpu_side_by_side.sh; its cold JIT start is minutes): run it on a machine whose /tmp already
# has native's JIT cache, or alone.
#
# First the host-trace GPU tests (tests/perf/test_host_trace.py -m gpu, ~10 s; TESTS=0 skips).
#
# env: WHEELHOUSE (.wheelhouse), NATIVE (.native), SITE (/tmp/site), WORK (/tmp/fd),
#      OUT (/tmp/dgap), MODEL ($WORK/ckpt-bf16), SKIP_INSTALL=1 (current environment), TESTS
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
export PYTHONUNBUFFERED=1
IMPLS=${1:-ours}
[ $# -gt 0 ] && shift
WH=${WHEELHOUSE:-.wheelhouse}
NX=${NATIVE:-.native}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/fd}
OUT=${OUT:-/tmp/dgap}
MODEL=${MODEL:-$WORK/ckpt-bf16}
mkdir -p "$OUT"
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
die() { echo "ERROR: $*" >&2; exit 2; }
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh

if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    site_install "$OUT"
fi
[[ ",$IMPLS," == *",native,"* ]] && native_packages "$OUT"
if [ ! -f "$MODEL/config.json" ]; then
    [ "$MODEL" = "$WORK/ckpt-bf16" ] || die "MODEL=$MODEL has no config.json"
    python3 scripts/side_by_side.py build --work "$WORK" > "$OUT/build.log" 2>&1 \
        || { tail -n 40 "$OUT/build.log"; die "checkpoint build failed"; }
    log "$(tail -n 1 "$OUT/build.log")"
fi
python3 -c "from importlib.metadata import entry_points as e; \
assert 'dsv4_hosttrace' in {p.name for p in e(group='sglang.srt.plugins')}" \
    || die "the dsv4_hosttrace entry point is not installed (pip install of this package)"

rc=0
if [ "${TESTS:-1}" = 1 ]; then  # the trace's own GPU tests: the marks, the graph census (~10 s)
    python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/perf/test_host_trace.py 2>&1 \
        | tail -n 15
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
for impl in ${IMPLS//,/ }; do
    log "dgap $impl"
    python3 scripts/dgap.py --impl "$impl" --model-path "$MODEL" --out "$OUT" \
        --profile-steps 8 "$@" 2>&1 | tee "$OUT/dgap_$impl.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || { rc=1; tail -n 40 "$OUT/dgap_$impl.server.log"; }
done
log "done, exit $rc"
exit $rc
