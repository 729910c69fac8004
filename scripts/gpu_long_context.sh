#!/usr/bin/env bash
# Long context on our server (issue 14, point 3): ONE device call from the repo root.
#
#   bash scripts/gpu_long_context.sh [scripts/side_by_side.py run options]
#   e.g. CHUNK=16384 bash scripts/gpu_long_context.sh --deadline-s 560
#
# One 131072-token request (TTFT, decode tok/s) and 32 requests of 32768 tokens through the
# side-by-side harness (SGLang's bench_one_batch_server against our server on the Flash-dims
# checkpoint: install + checkpoint as gpu_side_by_side.sh does, carry .wheelhouse on a cold
# machine), context length from the cells (132096), --chunked-prefill-size $CHUNK (8192),
# one warm pass then one timed run per cell. Output: $OUT/sbs_ours_132096.json and the table.
# The 1M limit on paper is CPU work: python scripts/long_context.py (docs/long_context.md).
set -uo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/gpu_side_by_side.sh ours --cells 131072x1,32768x32 --repeats 1 \
    --chunked-prefill-size "${CHUNK:-8192}" "$@"
