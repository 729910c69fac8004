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
# $SITE by an earlier call): SGLang's speculative worker imports deep_gemm (below).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WH=${WHEELHOUSE:-.wheelhouse}
NX=${NATIVE:-.native}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/fd}
RESULTS=${OUT:-/tmp/gpu_mtp}
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

if [ ! -f "$WORK/ckpt-bf16/config.json" ]; then
    python3 scripts/side_by_side.py build --work "$WORK" > "$RESULTS/build.log" 2>&1 \
        || { tail -n 60 "$RESULTS/build.log"; die "checkpoint build failed"; }
fi

python3 scripts/gpu_mtp.py --work "$WORK" --out "$RESULTS" "$@"
