#!/usr/bin/env bash
# MTP speculative decoding on the GPU machine (issue 15 point 5), ONE device call, repo root:
#
#   bash scripts/gpu_mtp.sh [scripts/gpu_mtp.py options]     # e.g. --native, --steps 3
#
# Needs sglang in $SITE (/tmp/site: installed by an earlier call from the wheelhouse) or a
# carried .wheelhouse; (re)installs THIS checkout's package into $SITE, builds the Flash-dims
# bf16 checkpoint into $WORK (/tmp/fd) when missing (~60 s), then runs scripts/gpu_mtp.py:
# JSON and server logs to $OUT, the table printed last. Needs SGLang's native DSV4 packages
# (DeepGEMM, TileLang) as scripts/gpu_side_by_side.sh installs them (.native, or unpacked into
# $SITE by an earlier call): SGLang's speculative worker imports deep_gemm (below). Before any
# server, scripts/mtp_preflight.py checks in seconds what only CUDA runs of SGLang's EAGLE worker
# do (its lazy imports, its CUDA kernels against our twins): an import failure stops the call
# there. BUDGET (default 510 s) bounds the whole call: gpu_mtp.py gets what is left as
# --deadline-s and still prints its table inside a ~560-600 s device call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WH=${WHEELHOUSE:-.wheelhouse}
NX=${NATIVE:-.native}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/fd}
RESULTS=${OUT:-/tmp/gpu_mtp}
BUDGET=${BUDGET:-510}
mkdir -p "$RESULTS"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
die() { echo "ERROR: $*" >&2; exit 2; }
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh

site_install "$RESULTS"
# DeepGEMM for every run, not only --native: SGLang 0.5.17's EAGLE worker imports
# layers.attention.dsa_backend (and with it deep_gemm) when it captures the draft's CUDA graphs,
# whatever the model (the H100 run of 2026-12-07 stopped there; sglang depends on sgl-deep-gemm,
# the offline wheelhouse leaves it to .native)
native_packages "$RESULTS"

python3 scripts/mtp_preflight.py > "$RESULTS/preflight.log" 2>&1
rc=$?
grep -E "^(preflight|  )" "$RESULTS/preflight.log" || tail -n 30 "$RESULTS/preflight.log"
[ "$rc" -ge 2 ] && die "MTP preflight failed (above; $RESULTS/preflight.log): no server started"
log "preflight done (exit $rc: 0 ok, 1 a kernel disagrees with our twin, measured anyway)"

if [ ! -f "$WORK/ckpt-bf16/config.json" ]; then
    python3 scripts/side_by_side.py build --work "$WORK" > "$RESULTS/build.log" 2>&1 \
        || { tail -n 60 "$RESULTS/build.log"; die "checkpoint build failed"; }
fi

python3 scripts/gpu_mtp.py --work "$WORK" --out "$RESULTS" \
    --deadline-s "$(( BUDGET - $(date +%s) + T0 ))" "$@"
