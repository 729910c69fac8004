#!/usr/bin/env bash
# One extend step's torch ops and launches (issue 14: TTFT), this tree against main, on the GPU in
# one command from the repo root (carry .wheelhouse and .base = main where this branch left it,
# extracted there: `rm -rf .base && mkdir .base && git archive $(git merge-base main HEAD) |
# tar -x -C .base`):
#
#   bash scripts/gpu_xlayer.sh   install (~20 s), then (at most ~6.5 min: the timeouts below):
#     1. the GPU tests of what changed: the compressor flush reading bf16 ape / norm as stored
#        (bit for bit the launch on fp32 copies, Flash dims) and its prefill / extend tests;
#        the indexer's w_scale (bit for bit the pre-scaled weights, 8K prefill) and its Flash
#        prefill; the extend wrappers' kernels against the twins; FP8Linear / fp8_block_linear
#        (scale bytes viewed once); the kept-quantized model (FP8 linears, FP4 expert banks whose
#        operands lost their dtype views) and the MXFP4 grouped experts; FlashMLA vs ours
#        (pytest under 160 s);
#     2. scripts/bench_layer_host.py --device cuda on .base, then on this tree (--compare):
#        one extend step of the Flash-dims model (SWA, CSA, HCA, CSA; 16 experts, 4096 vocab,
#        random weights) at 2x150 and 1x8192 tokens: torch ops / launching ops / Triton+FlashMLA
#        launches per layer kind and in total (before -> now), and the median of 10 timed steps:
#        host issue ms (plan + forward returned) and step ms (device done); under 110 s each
#        (Triton compiles included). Printed last.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_xlayer), REPS (10).
# Exit status: the tests', else the benches'.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_xlayer || exit 1  # sets WH, OUT, start; this checkout first on PYTHONPATH
gpu_tests_and_ab main 160 \
    tests/kernels/test_compressor.py tests/kernels/test_indexer_extend.py \
    tests/attention/test_wrappers.py tests/kernels/test_fp8_linear.py \
    tests/model/test_kept_quantized.py tests/kernels/test_moe_experts.py \
    tests/attention/test_extend_choice.py \
    -k "bf16_weights or gpu_prefill_and_extend or gpu_indexer_compressor or weight_scale \
        or gpu_flash_dims_prefill or kernels_equal_twin_on_gpu or gpu_kept_model \
        or fp8_linear or (experts_gpu_flash_dims and mxfp4) or gpu_flashmla_extend"
