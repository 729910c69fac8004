# Sourced by the one-command GPU scripts (gpu_side_by_side.sh, gpu_mtp.sh): the device
# machine's Python set-up. Needs WH (wheelhouse dir), NX (.native dir), SITE, and log / die.
#
#   site_install LOGDIR    sglang from the carried wheelhouse, or $SITE of an earlier call on
#                          this warm machine; then this checkout's package into $SITE
#   native_packages LOGDIR SGLang's native DSV4 packages (DeepGEMM, TileLang, libz3)
#   wheelhouse_start NAME  the short kernel scripts' start (gpu_moe_sorted.sh, gpu_rope_slot.sh,
#                          gpu_topk.sh, gpu_mhcdec.sh):
#                          WH (default .wheelhouse), OUT (default /tmp/NAME) made, start time,
#                          the wheelhouse installed (not again with SITE_READY=1 once $SITE
#                          has sglang: scripts/gpu_checks.sh), this checkout first on
#                          PYTHONPATH (not pip-installed); no log / die needed
#   layer_host_ab LABEL    bench_layer_host.py --device cuda on .base, then on this tree
#                          (--compare): one extend step's ops / launches / timed steps, base
#                          (LABEL) -> this tree, printed last
#   gpu_tests_and_ab LABEL LIMIT PYTEST_ARGS...
#                          a branch check (gpu_xlayer.sh, gpu_xplan.sh): .base present, the GPU
#                          tests (-m gpu, at most LIMIT s), then layer_host_ab LABEL; returns the
#                          tests' status, else the benches'
# Sourcing it also restores the carried JIT caches (scripts/jit_cache.sh: .jitcache/).

site_install() {
    local logs=$1
    if [ -f "$WH/install_on_device.sh" ]; then
        # shellcheck disable=SC1091
        source "$WH/install_on_device.sh" "$WH" > "$logs/install.log" 2>&1 \
            || { cat "$logs/install.log"; die "wheelhouse install failed"; }
        log "wheelhouse installed into $SITE"
    elif [ -d "$SITE/sglang" ]; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        log "no wheelhouse carried: reusing $SITE from an earlier call"
    else
        die "no $WH carried and $SITE/sglang missing: not the warm machine of call 1 (run call 1 again, carrying .wheelhouse)"
    fi
    python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target "$SITE" . \
        >> "$logs/install.log" 2>&1 || { tail -n 30 "$logs/install.log"; die "pip install of this package failed"; }
}

native_packages() {
    local logs=$1
    if [ -f "$NX/install_native_extra.sh" ] && [ -f "$NX/dsv4_native_extra.tar.xz" ]; then
        # shellcheck disable=SC1091
        source "$NX/install_native_extra.sh" "$NX" > "$logs/native_install.log" 2>&1 \
            || { cat "$logs/native_install.log"; die "native packages did not install"; }
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
    python3 -c "import deep_gemm, tilelang" > "$logs/native_import.log" 2>&1 \
        || { tail -n 30 "$logs/native_import.log"; die "deep_gemm / tilelang do not import"; }
}

wheelhouse_start() {
    WH=${WHEELHOUSE:-.wheelhouse}
    OUT=${OUT:-/tmp/$1}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    start=$(date +%s)
    if [ "${SITE_READY:-0}" = 1 ] && [ -d "${SITE:-/tmp/site}/sglang" ]; then
        # an earlier script of the same call installed it (scripts/gpu_checks.sh)
        export PYTHONPATH="${SITE:-/tmp/site}${PYTHONPATH:+:$PYTHONPATH}"
    else
        # shellcheck disable=SC1091
        source "$WH/install_on_device.sh" "$WH" > "$OUT/install.log" 2>&1 \
            || { cat "$OUT/install.log"; return 1; }
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, the wheelhouse's sglang
    echo "installed in $(( $(date +%s) - start )) s"
}

layer_host_ab() {  # LABEL; needs OUT, start (wheelhouse_start); returns the benches' status
    local label=$1 name first brc rc=0
    mkdir -p "$OUT/ours" "$OUT/base"
    for name in base ours; do
        first=$PWD/.base
        set --
        if [ "$name" = ours ]; then
            first=$PWD
            set -- --compare "$OUT/base/bench_layer_host.json"
        fi
        PYTHONPATH="$first:$PYTHONPATH" timeout 110 python3 scripts/bench_layer_host.py \
            --device cuda --cases 2x150,1x8192 --reps "${REPS:-10}" --out "$OUT/$name" "$@" \
            > "$OUT/bench_$name.txt" 2>&1
        brc=$?
        echo "== bench_layer_host $name ($first), exit $brc at $(( $(date +%s) - start )) s"
        [ "$brc" = 0 ] || { tail -n 20 "$OUT/bench_$name.txt"; rc=$brc; }
    done
    echo "== one extend step, Flash dims, base ($label) -> this tree, on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
    grep -E -A 10 "^[0-9]+x[0-9]+: section" "$OUT/bench_ours.txt"
    return "$rc"
}

gpu_tests_and_ab() {  # LABEL LIMIT PYTEST_ARGS...; needs start (wheelhouse_start)
    local label=$1 limit=$2 rc b
    shift 2
    [ -d .base/sglang_dsv4 ] || { echo "no .base/sglang_dsv4: carry .base (git archive $label)"; return 1; }
    timeout "$limit" python3 -m pytest -q -p no:cacheprovider -rfE -m gpu "$@" 2>&1 | tail -n 25
    rc=${PIPESTATUS[0]}
    echo "GPU tests exit $rc at $(( $(date +%s) - start )) s"
    layer_host_ab "$label"
    b=$?
    [ "$rc" = 0 ] && rc=$b
    return "$rc"
}

# shellcheck source=scripts/jit_cache.sh
source scripts/jit_cache.sh
jit_cache_restore
