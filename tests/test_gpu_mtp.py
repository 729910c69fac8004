"""scripts/gpu_mtp.py without a GPU: accept length and decode rate from SGLang-shaped streams
(a stub server: the finished chunk's ``meta_info`` carries ``spec_verify_ct``), and a
``--deadline-s`` already spent skips every run yet prints the table."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_mtp  # noqa: E402


class _Stream(BaseHTTPRequestHandler):
    """``/generate`` streamed as SGLang does: cumulative ``output_ids`` per chunk; the spec
    metrics only in the finished chunk (``tokenizer_manager._calculate_spec_decoding_metrics``)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        new = body["sampling_params"]["max_new_tokens"]
        self.send_response(200)
        self.end_headers()
        ids = []
        for step in range(0, new, 3):  # 3 tokens per verify pass after the first
            ids = list(range(min(new, step + 3)))
            meta = {"completion_tokens": len(ids)}
            if len(ids) == new:
                meta["spec_verify_ct"] = -(-new // 3)
            chunk = {"output_ids": ids, "meta_info": meta}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_accept_length_from_the_finished_chunk(stub_url):
    r = gpu_mtp.run_batch(stub_url, [[1, 2, 3]] * 4, 12)
    assert r["tokens"] == 48 and r["verify_passes"] == 16
    assert r["accept_length"] == 3.0
    assert r["output_ids"] == [list(range(12))] * 4
    assert r["decode_tok_s"] is None or r["decode_tok_s"] > 0


def test_spent_deadline_skips_every_run_and_prints_the_table(tmp_path):
    args = ["--models", "dsv4,flash", "--deadline-s", "1", "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_mtp.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert out.stdout.count(": skipped,") == 4 and "| model | batch |" in out.stdout
    doc = json.loads((tmp_path / "gpu_mtp.json").read_text())
    assert doc["runs"] == {} and doc["table"].startswith("| model")
