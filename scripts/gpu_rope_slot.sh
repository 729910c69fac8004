#!/usr/bin/env bash
# The norm / RoPE launch shapes and the MoE slot-sum kernel on the GPU in one command, from the
# repo root (wheelhouse carried as .wheelhouse):
#
#   bash scripts/gpu_rope_slot.sh   install, then
#     1. GPU tests (~1-2 min on an H100, most of it Triton compiles): the slot sum == torch's
#        CUDA sum bit for bit (d 4096, S 3 / 7, T 1 ... 8192), every rms_rope_ launch-shape
#        candidate == the default shape bit for bit (q norm + RoPE, the output's inverse RoPE,
#        indexer RoPE, KV; T 1 ... 8192), norm_rope against ref, and the sorted MoE form (which
#        now sums its slots with the kernel) against the twin, eager and graph-replayed;
#     2. scripts/bench_ops.py --slot-sum, then --rope-shapes (~1 min): the slot sum vs torch at
#        T 1 / 128 / 8192, every launch shape of the three served rms_rope_ uses at T 1 / 32 /
#        128 / 1024 / 8192; prints the table and the norm_rope_shapes.MEASURED rows last.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_rope_slot), BENCH=0
#      skips step 2. Exit status: the tests', else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_rope_slot || exit 1  # sets WH, OUT, start
python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_slot_sum.py \
    tests/kernels/test_norm_rope_shapes.py tests/kernels/test_norm_rope.py \
    tests/kernels/test_moe_experts.py \
    -k "(slot_sum or candidate or rope or rms or sorted) and not every_tile and not 256-2048" \
    2>&1 | tail -n 30
rc=${PIPESTATUS[0]}
echo "tests exit $rc at $(( $(date +%s) - start )) s"
if [ "${BENCH:-1}" = 1 ]; then
    cfg=configs/dsv4-flash-dims.json
    python3 scripts/bench_ops.py --slot-sum --config "$cfg" --tokens 1,128,8192 --reps 20 \
        --calls 10 --out "$OUT" > "$OUT/bench_slot_sum.txt" 2>&1
    src=$?
    python3 scripts/bench_ops.py --rope-shapes --config "$cfg" --tokens 1,32,128,1024,8192 \
        --reps 20 --calls 10 --out "$OUT" > "$OUT/bench_rope_shapes.txt" 2>&1
    brc=$?
    grep "BITS DIFFER" "$OUT/bench_rope_shapes.txt"
    cat "$OUT/bench_slot_sum.txt"
    grep -A 40 "default -> fastest" "$OUT/bench_rope_shapes.txt" || tail -n 40 "$OUT/bench_rope_shapes.txt"
    echo "bench exit $src / $brc at $(( $(date +%s) - start )) s"
    [ "$rc" = 0 ] && rc=$src
    [ "$rc" = 0 ] && rc=$brc
fi
exit "$rc"
