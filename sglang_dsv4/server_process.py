"""A real SGLang server in a subprocess (our plugin loads through its entry point), for tests,
benchmarks and evals: ``Server(args, log_path)`` starts ``python -m sglang.launch_server`` and
waits for ``/health``; ``generate`` sends greedy ``/generate`` requests by token ids."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

__all__ = ["Server", "free_port", "launch_and_expect_failure"]


def _server_env(extra: dict | None) -> dict:
    """The server's environment: ours, minus a test run's Triton interpreter switch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, **(extra or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m sglang.launch_server`` in a subprocess; ``log`` holds its output."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict | None = None,
        timeout: float = 300,
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "sglang.launch_server", *args, "--port", str(self.port)]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_server_env(env),
        )
        self._wait(timeout)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log[-4000:]}"
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not up after {timeout}s:\n{self.log[-4000:]}")

    def generate(
        self, input_ids: list[int], max_new_tokens: int, timeout: float = 600, **extra
    ) -> dict:
        body = {
            "input_ids": input_ids,
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": max_new_tokens,
                "ignore_eos": True,
            },
            "return_logprob": True,
            "logprob_start_len": 0,
            **extra,
        }
        r = requests.post(self.url + "/generate", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def launch_and_expect_failure(args: list[str], log_path: Path, timeout: float = 300) -> str:
    """Run a server that must fail at startup; return its output."""
    cmd = [sys.executable, "-m", "sglang.launch_server", *args, "--port", str(free_port())]
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=_server_env(None)
        )
    assert proc.returncode != 0, "the server started although it must not"
    return log_path.read_text()
