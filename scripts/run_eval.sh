#!/usr/bin/env bash
# Offline accuracy checks of a served DSV4 model: held-out perplexity and top-1 next to HF
# transformers (fp32), planted-fact retrieval at 2K-16K tokens, decode vs re-prefill KL, and
# GSM8K for a real DSV4 checkpoint. Starts a server (or uses the one answering on --port).
#   scripts/run_eval.sh [--model dsv4|PATH] [--port N] [--quick] [--out DIR] [--server-args "..."]
# Python: $PYTHON, else the project's cached virtualenv (scripts/install_and_test.sh), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    # shellcheck source=scripts/venv.sh
    source scripts/venv.sh
    if [ -x "$venv/bin/python" ]; then PYTHON=$venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m sglang_dsv4.evals.run "$@"
