"""scripts/serve.sh (README's run command) finds the virtualenv that install_and_test.sh builds."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serve_without_virtualenv_says_what_to_run(tmp_path):
    env = {**os.environ, "DSV4_VENV": str(tmp_path / "none")}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "serve.sh")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1
    assert f"no virtualenv at {tmp_path / 'none'}" in out.stderr
    assert "bash scripts/install_and_test.sh" in out.stderr


def test_serve_and_install_use_one_virtualenv_path(tmp_path):
    """Both source scripts/venv.sh: the path printed by the install equals serve's."""
    code = f"source {ROOT / 'scripts' / 'venv.sh'}; echo $venv"
    env = {k: v for k, v in os.environ.items() if k != "DSV4_VENV"}
    got = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert got.stdout.strip().startswith(str(Path.home() / ".cache/sglang-dsv4/venv-"))
    for script in ("install_and_test.sh", "serve.sh", "run_eval.sh"):
        assert "venv.sh" in (ROOT / "scripts" / script).read_text()
