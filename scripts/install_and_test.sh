#!/usr/bin/env bash
# One command on a fresh machine: build (or reuse) the test virtualenv, install this package, run
# ruff and the CPU test suite. The virtualenv is cached under ~/.cache keyed on the dependency pins
# in pyproject.toml, and rebuilt from nothing when absent or incomplete.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
PY=$base_python

if [ ! -f "$venv/.complete" ]; then
    echo "building virtualenv $venv (sglang==0.5.17 and its CUDA torch: ~5-10 min)"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
    # Dependencies only; the package itself is installed editable below on every run.
    deps=$("$venv/bin/python" -c 'import tomllib; p=tomllib.load(open("pyproject.toml","rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))')
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet $deps
    touch "$venv/.complete"
fi

"$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e .
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check . || { echo "ruff format would change files (run: ruff format .)"; exit 1; }
# pytest exits 5 when it collects nothing: that is a failure here, never green.
# Two workers by default (PYTEST_WORKERS=0: one process), a test file per worker at a time: the
# module-scoped test servers start once per file (2026-12-07, 2 cores: 80 -> 40 min).
"$venv/bin/python" -m pytest -q --durations=12 -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
echo "tests passed; the virtualenv is $venv. Serve the embedded model: bash scripts/serve.sh"
