"""The SGLang server the evals talk to: started here (a
:class:`sglang_dsv4.server_process.Server`) or already running on a port, and the few HTTP calls
the evals make."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import requests

from sglang_dsv4.server_process import Server as ServerProcess

__all__ = ["Server", "attach_or_start"]


@dataclass
class Server:
    url: str
    model_path: str  # local directory or repo id the server loaded
    process: ServerProcess | None = None  # None: not ours, left running
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
        if self.process is not None:
            self.process.stop()


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
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = ["--model-path", model or "dsv4", *server_args]
    process = ServerProcess(args, log_path, timeout=timeout, port=port)
    info = requests.get(process.url + "/model_info", timeout=30).json()
    return Server(process.url, info["model_path"], process, info)
