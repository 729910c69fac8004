# Sourced by the scripts: sets $venv, the project's cached virtualenv (built by
# scripts/install_and_test.sh, keyed on the dependency pins and the Python version; $DSV4_VENV
# overrides), and $base_python, the interpreter it is built from ($PYTHON, else python3.11,
# else python3).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_python=${PYTHON:-python3.11}
command -v "$base_python" >/dev/null || base_python=python3
venv=${DSV4_VENV:-$HOME/.cache/sglang-dsv4/venv-$(cd "$_root" && "$base_python" .ci/venv_key.py)}
# run directly (`bash scripts/venv.sh`): print the path
if [ "${BASH_SOURCE[0]}" = "$0" ]; then echo "$venv"; fi
