#!/usr/bin/env bash
# TP1 vs TP-N on a multi-GPU machine, one command from the repo root (wheelhouse carried as
# .wheelhouse; installs as scripts/gpu_e2e.sh does, whose --tp mode this is):
#
#   bash scripts/gpu_tp.sh            scripts/gpu_tp.py --tp 1 2: a Flash-dims DSV4 with 8 layers
#                                     (bf16, random) served at TP1 and TP2 on the same
#                                     checkpoint: KL(TP2 || TP1), greedy agreement, prefill and
#                                     decode throughput (bench_one_batch_server, 2K input,
#                                     batch 1 / 32); ~8 min on 2 H100s.
#   bash scripts/gpu_tp.sh 1 4        the TP sizes to run (the first must be 1).
#
# env: WHEELHOUSE (default .wheelhouse), OUT (logs + JSON, default /tmp/gpu_tp). Exit status 1
# if a gate fails (per prompt: KL mean <= 0.01, greedy agreement >= 0.9).
OUT=${OUT:-/tmp/gpu_tp} exec bash "$(dirname "$0")/gpu_e2e.sh" --tp "$@"
