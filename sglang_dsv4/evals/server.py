"""The SGLang server the evals talk to: started here (``python -m sglang.launch_server``) or
already running on a port, and the few HTTP calls the evals make."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

__all__ = ["Server", "attach_or_start"]


@dataclass
class Server:
    url: str
    model_path: str  # local directory or repo id the server loaded
    proc: subprocess.Popen | None = None  # None: not ours, left running
    log_path: Path | None = None
    info: dict = field(default_factory=dict)

    def generate(self, input_ids, max_new_tokens: int, **extra) -> dict | list:
        """``/generate`` with greedy sampling; ``input_ids`` one list or a batch of lists."""
        body = {
            "input_ids": input_ids,
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": max_new_tokens,
                "ignore_eos": True,
            },
            **extra,
        }
        r = requests.post(self.url + "/generate", json=body, timeout=3600)
        r.raise_for_status()
        return r.json()

    def flush_cache(self) -> None:
        requests.post(self.url + "/flush_cache", timeout=60).raise_for_status()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def attach_or_start(
    model: str | None,
    port: int | None,
    server_args: list[str],
    log_path: Path,
    timeout: float = 900,
) -> Server:
    """A server on ``port`` if one answers there, else a new one for ``model`` (on ``port`` or a
    free port). ``model`` may be a path, a repo id or one of this package's names (``dsv4``)."""
    if port is not None and _healthy(url := f"http://127.0.0.1:{port}"):
        info = requests.get(url + "/model_info", timeout=30).json()
        return Server(url=url, model_path=info["model_path"], info=info)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model or "dsv4"]
    cmd += ["--port", str(port), *server_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - the child writes into it until stop()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"server exited ({proc.returncode}):\n{tail}")
        if _healthy(url):
            info = requests.get(url + "/model_info", timeout=30).json()
            return Server(url, info["model_path"], proc, log_path, info)
        time.sleep(1)
    proc.kill()
    raise TimeoutError(f"server not up after {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")
