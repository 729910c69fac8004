#!/usr/bin/env bash
# MTP speculative decoding on the GPU machine (issue 15 point 5), ONE device call, repo root:
#
#   bash scripts/gpu_mtp.sh [scripts/gpu_mtp.py options]     # e.g. --native, --steps 3
#
# Needs sglang in $SITE (/tmp/site: installed by an earlier call from the wheelhouse) or a
# carried .wheelhouse; (re)installs THIS checkout's package into $SITE, builds the Flash-dims
# bf16 checkpoint into $WORK (/tmp/fd) when missing (~60 s), then runs scripts/gpu_mtp.py:
# JSON and server logs to $OUT, the table printed last. --native also needs SGLang's native
# DSV4 packages (DeepGEMM, TileLang) as scripts/gpu_side_by_side.sh installs them (.native).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WH=${WHEELHOUSE:-.wheelhouse}
NX=${NATIVE:-.native}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/fd}
RESULTS=${OUT:-/tmp/gpu_mtp}
mkdir -p "$RESULTS"
die() { echo "ERROR: $*" >&2; exit 2; }

if [ -f "$WH/install_on_device.sh" ]; then
    # shellcheck disable=SC1091
    source "$WH/install_on_device.sh" "$WH" > "$RESULTS/install.log" 2>&1 \
        || { tail -n 40 "$RESULTS/install.log"; die "wheelhouse install failed"; }
elif [ -d "$SITE/sglang" ]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    die "no $WH carried and $SITE/sglang missing"
fi
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target "$SITE" . \
    >> "$RESULTS/install.log" 2>&1 || { tail -n 30 "$RESULTS/install.log"; die "pip install of this package failed"; }

if [[ " $* " == *" --native "* ]]; then
    if [ -f "$NX/install_native_extra.sh" ] && [ -f "$NX/dsv4_native_extra.tar.xz" ]; then
        # shellcheck disable=SC1091
        source "$NX/install_native_extra.sh" "$NX" > "$RESULTS/native_install.log" 2>&1 \
            || { tail -n 40 "$RESULTS/native_install.log"; die "native packages did not install"; }
    elif [ -d "$SITE/deep_gemm" ] && [ -d "$SITE/tilelang" ]; then
        export CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
        export LD_LIBRARY_PATH="/tmp/z3lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export DG_JIT_CACHE_DIR=/tmp/jitcache/deep_gemm TILELANG_CACHE_DIR=/tmp/jitcache/tilelang
        export TVM_FFI_CACHE_DIR=/tmp/jitcache/tvm-ffi
    else
        die "--native needs DeepGEMM / TileLang: carry .native (see scripts/gpu_side_by_side.sh)"
    fi
fi

if [ ! -f "$WORK/ckpt-bf16/config.json" ]; then
    python3 scripts/side_by_side.py build --work "$WORK" > "$RESULTS/build.log" 2>&1 \
        || { tail -n 60 "$RESULTS/build.log"; die "checkpoint build failed"; }
fi

python3 scripts/gpu_mtp.py --work "$WORK" --out "$RESULTS" "$@"
