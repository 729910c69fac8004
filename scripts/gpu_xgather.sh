#!/usr/bin/env bash
# FlashMLA's extend prep in fewer launches (issue 14: kernels/kv_gather.py, the c4 picks written
# by the top-k select into FlashMLA's index lists), on the GPU in one command from the repo root
# (carry .wheelhouse):
#
#   bash scripts/gpu_xgather.sh   install (~20 s), then (at most 200 + 90 s):
#     1. the GPU tests at Flash dims (64 heads x 512 = 448 e4m3 + 64 RoPE, 584-byte rows, pages
#        of 256): tests/kernels/test_kv_gather.py (bit-equal to SGLang's dequantize_k_cache_paged
#        and to the twin), test_indexer_extend.py (the picks into the lists, the rows select),
#        test_indexer.py (the decode select, whose kernel took the new arguments: prefill,
#        CUDA-graph replay), test_extend_choice.py (FlashMLA over the new workspace and lists vs
#        ours, csa / hca / swa);
#     2. scripts/bench_xgather.py: main's two dequant launches vs one gather, 8192 tokens (c4:
#        2048 entries, c128: 64; and the last 8192-token chunk of a 32K prompt), bit-equality
#        checked; main's per-layer picks -> lists ops vs none; table last.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_xgather), REPS (50).
# Exit status: the tests', else the bench's.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_xgather || exit 1  # sets WH, OUT, start; this checkout first on PYTHONPATH
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu \
    tests/kernels/test_kv_gather.py \
    "tests/kernels/test_indexer_extend.py::test_gpu_flash_dims_picks_into_lists" \
    "tests/kernels/test_indexer_extend.py::test_gpu_flash_dims_rows_select[8]" \
    "tests/kernels/test_indexer_extend.py::test_gpu_flash_dims_32k_chunk" \
    "tests/kernels/test_indexer.py::test_gpu_prefill" \
    "tests/kernels/test_indexer.py::test_gpu_cuda_graph_replay" \
    tests/attention/test_extend_choice.py 2>&1 | tail -n 20
rc=${PIPESTATUS[0]}
echo "tests exit $rc at $(( $(date +%s) - start )) s"
timeout 90 python3 scripts/bench_xgather.py --reps "${REPS:-50}" --out "$OUT" \
    > "$OUT/bench_xgather.txt" 2>&1
brc=$?
tail -n 8 "$OUT/bench_xgather.txt"
echo "bench exit $brc at $(( $(date +%s) - start )) s"
[ "$rc" = 0 ] && rc=$brc
exit "$rc"
