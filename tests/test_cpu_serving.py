"""CPU serving defaults (``sglang_dsv4/cpu_serving.py``) and what they buy on a real
``--model dsv4`` server: one startup log line naming them, and all server processes together
within issue 18's 4 GB resident memory after the first completion (the time goal, 20 s, lives
in ``scripts/cpu_first_completion.py --max-seconds``: a speed goal, so a benchmark)."""

import json

import pytest

from sglang_dsv4.cpu_serving import (
    CPU_CONTEXT,
    SMALL_CHECKPOINT_BYTES,
    checkpoint_bytes,
    cpu_context,
    cpu_threads,
)
from sglang_dsv4.embedded import EMBEDDED_CONTEXT, embedded_checkpoint

RSS_GOAL = 4e9  # bytes, issue 18


def _checkpoint(tmp_path, max_positions, weight_bytes=10):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": max_positions}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return str(tmp_path)


def test_context_embedded_is_its_training_length():
    ctx, why = cpu_context(str(embedded_checkpoint()), embedded=True)
    assert ctx == EMBEDDED_CONTEXT and "training length" in why


def test_context_of_a_1m_checkpoint_is_capped_and_says_so(tmp_path):
    ctx, why = cpu_context(_checkpoint(tmp_path, 1048576), embedded=False)
    assert ctx == CPU_CONTEXT and "allows 1048576" in why and "--context-length" in why


def test_context_of_a_short_checkpoint_is_its_own(tmp_path):
    ctx, why = cpu_context(_checkpoint(tmp_path, 2048), embedded=False)
    assert ctx == 2048 and "max_position_embeddings" in why


def test_context_of_a_remote_checkpoint_is_the_cpu_default():
    ctx, why = cpu_context("deepseek-ai/DeepSeek-V4-Flash", embedded=False)
    assert ctx == CPU_CONTEXT and "no local config.json" in why


def test_threads(tmp_path):
    small = _checkpoint(tmp_path, 4096, weight_bytes=1000)
    assert checkpoint_bytes(small) == 1000
    assert cpu_threads(small, environ={}) == 1
    assert cpu_threads(small, environ={"OMP_NUM_THREADS": "4"}) is None  # the user's
    assert cpu_threads(small, environ={"OMP_NUM_THREADS": "1"}) == 1
    assert cpu_threads("deepseek-ai/DeepSeek-V4-Flash", environ={}) is None
    assert checkpoint_bytes(str(embedded_checkpoint())) < SMALL_CHECKPOINT_BYTES


def test_large_checkpoint_keeps_torch_threads(tmp_path):
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(SMALL_CHECKPOINT_BYTES)
    assert checkpoint_bytes(str(tmp_path)) == SMALL_CHECKPOINT_BYTES
    assert cpu_threads(str(tmp_path), environ={}) is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU serving defaults")
def test_server_args_context_default_for_other_checkpoints(tmp_path):
    """A local DSV4 checkpoint other than the embedded one gets the CPU context default, a
    user's ``--context-length`` wins."""
    import subprocess
    import sys

    cfg = json.loads((embedded_checkpoint() / "config.json").read_text())
    assert cfg["max_position_embeddings"] > CPU_CONTEXT
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins()\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        f"a = prepare_server_args(['--model-path', {str(tmp_path)!r}, '--skip-tokenizer-init'])\n"
        f"b = prepare_server_args(['--model-path', {str(tmp_path)!r}, '--skip-tokenizer-init',"
        " '--context-length', '300000'])\n"
        "print('CTX', a.device, a.context_length, b.context_length)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("CTX ")), None)
    assert line is not None, out.stderr[-3000:]
    assert line.split()[1:] == ["cpu", str(CPU_CONTEXT), "300000"]


@pytest.mark.server
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU serving defaults")
def test_embedded_server_footprint_and_startup_line(tmp_path):
    """``--model dsv4`` on CPU: the startup line names the context, the thread count and the
    forked children; after the first completion every server process together stays within
    issue 18's 4 GB resident memory (measured 2.66 GiB = 2.86 GB on the 2-core machine)."""
    import psutil
    import requests
    from server import Server

    srv = Server(["--model", "dsv4", "--sleep-on-idle"], tmp_path / "dsv4.log", timeout=900)
    try:
        body = {"model": "dsv4", "prompt": "KING HENRY:", "max_tokens": 8, "temperature": 0}
        r = requests.post(srv.url + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        root = psutil.Process(srv.proc.pid)
        procs = [root, *root.children(recursive=True)]
        rss = {f"{p.pid} {p.name()}": p.memory_info().rss for p in procs}
        log = srv.log
    finally:
        srv.stop()
    line = next((ln for ln in log.splitlines() if "DSV4 on CPU:" in ln), "")
    assert f"context length {EMBEDDED_CONTEXT} (the embedded model's training length)" in line
    assert "1 torch thread per process" in line and "forked from the launcher" in line, line
    assert sum(rss.values()) <= RSS_GOAL, rss
