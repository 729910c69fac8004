#!/usr/bin/env bash
# The extend plan in two launches (issue 14: TTFT), this tree against main before it, on the GPU
# in one command from the repo root (carry .wheelhouse and .base = the commit before the plan
# kernels, extracted there: `rm -rf .base && mkdir .base && git archive 4192754 | tar -x -C .base`,
# the tiny model's safetensors removed from .base):
#
#   bash scripts/gpu_xplan.sh   install (~20 s), then (at most ~6 min: the timeouts below):
#     1. the GPU tests of what changed: kernels/extend_meta (the plan's tables, modes, checks and
#        tail progress; 8K, 32K after 24K, 16 x 4K chunks, 129 requests over a 131K context) and
#        kernels/flashmla_lists (SWA / c4 / c128 lists and entry rows) against their torch forms;
#        plan_batch with either builder raising no synchronizing call; FlashMLA vs ours through
#        the kernels' lists (pytest under 150 s);
#     2. scripts/bench_layer_host.py --device cuda on .base, then on this tree (--compare): one
#        extend step of the Flash-dims model at 2x150 and 1x8192 tokens, torch ops / launches per
#        section (the plan's: 172 -> 55 and 246 -> 51 counted on CPU) and the median of 10 timed
#        steps: host issue ms (plan + forward returned) and step ms (device done). Printed last.
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_xplan), REPS (10).
# Exit status: the tests', else the benches'.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/device_setup.sh
source scripts/device_setup.sh
wheelhouse_start gpu_xplan || exit 1  # sets WH, OUT, start; this checkout first on PYTHONPATH
gpu_tests_and_ab 4192754 150 \
    tests/kernels/test_extend_meta.py tests/kernels/test_flashmla_lists.py \
    tests/attention/test_plan_facts.py tests/attention/test_plan.py \
    tests/attention/test_extend_choice.py
