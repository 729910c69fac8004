#!/usr/bin/env bash
# MTP speculative decoding on the GPU machine (issue 15 point 5), ONE device call, repo root:
#
#   bash scripts/gpu_mtp.sh [scripts/gpu_mtp.py options]     # e.g. --native, --steps 3
#
# The wheelhouse (~38 MB) and .native (~30 MB) do not fit one carry (64 MiB), so three calls on
# one warm machine (estimates from the H100 run of 2026-12-07: a plain server up in 36-68 s, an
# MTP server through its graph captures in ~40 s, ~20 s between servers):
#   1. carry .wheelhouse:  SETUP_ONLY=1 bash scripts/gpu_mtp.sh   (install + checkpoint, ~2 min)
#   2. carry .native:      bash scripts/gpu_mtp.sh --models dsv4  (preflight + 2 servers, ~5 min)
#   3. carry nothing:      bash scripts/gpu_mtp.sh --models flash (~4.5 min)
# (--models dsv4,flash in one call needs ~9 min: BUDGET then cuts the last runs.)
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
# --deadline-s and still prints its table inside a ~560-600 s device call. GPU_TESTS=1 also runs
# the speculative GPU unit tests first (the verify kernels against the twin and a captured verify
# step replayed against the eager one, never passed on a GPU yet; the preflight as a test).
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

checkpoint() {
    if [ ! -f "$WORK/ckpt-bf16/config.json" ]; then
        python3 scripts/side_by_side.py build --work "$WORK" > "$RESULTS/build.log" 2>&1 \
            || { tail -n 60 "$RESULTS/build.log"; die "checkpoint build failed"; }
    fi
}

site_install "$RESULTS"
if [ "${SETUP_ONLY:-0}" = 1 ]; then  # call 1: no .native yet (it does not fit the same carry)
    checkpoint
    log "SETUP_ONLY: sglang and this package in $SITE, checkpoint in $WORK/ckpt-bf16"
    exit 0
fi
# DeepGEMM for every run, not only --native: SGLang 0.5.17's EAGLE worker imports
# layers.attention.dsa_backend (and with it deep_gemm) when it captures the draft's CUDA graphs,
# whatever the model (the H100 run of 2026-12-07 stopped there; sglang depends on sgl-deep-gemm,
# the offline wheelhouse leaves it to .native)
native_packages "$RESULTS"

python3 scripts/mtp_preflight.py > "$RESULTS/preflight.log" 2>&1
rc=$?
grep -E "^(preflight|  )" "$RESULTS/preflight.log" || tail -n 30 "$RESULTS/preflight.log"
[ "$rc" -ge 2 ] && die "MTP preflight failed (above; $RESULTS/preflight.log): no server started"
log "preflight done (exit $rc: 0 ok, 1 a kernel check failed: measured anyway)"
if [ "${GPU_TESTS:-0}" = 1 ]; then
    PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/attention/test_verify_kernels.py \
        tests/test_mtp_preflight.py > "$RESULTS/gpu_tests.log" 2>&1
    tail -n 15 "$RESULTS/gpu_tests.log"
    log "GPU tests done (the servers run either way)"
fi

checkpoint
python3 scripts/gpu_mtp.py --work "$WORK" --out "$RESULTS" \
    --deadline-s "$(( BUDGET - $(date +%s) + T0 ))" "$@"
