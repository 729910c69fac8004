#!/usr/bin/env bash
# Start the SGLang server from the project's virtualenv (built by scripts/install_and_test.sh):
#   bash scripts/serve.sh                          # the embedded model (--model dsv4), port 30000
#   bash scripts/serve.sh --port 30001 [...]       # any `python -m sglang.launch_server` arguments
#   bash scripts/serve.sh --model-path DIR [...]   # another checkpoint
set -euo pipefail
# shellcheck source=scripts/venv.sh
source "$(dirname "$0")/venv.sh"
if [ ! -f "$venv/.complete" ]; then
    echo "no virtualenv at $venv: run 'bash scripts/install_and_test.sh' first" >&2
    exit 1
fi
case " $* " in
    *" --model "* | *" --model="* | *" --model-path "* | *" --model-path="*) ;;
    *) set -- --model dsv4 "$@" ;;
esac
exec "$venv/bin/python" -m sglang.launch_server "$@"
