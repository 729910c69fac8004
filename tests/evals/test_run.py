"""``scripts/run_eval.sh --quick`` on CPU with the shipped model: starts the server, passes its
gates, writes the JSON and the plot. Plus the pieces that need no server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sglang_dsv4.embedded import embedded_checkpoint
from sglang_dsv4.evals.retrieval import build_prompts
from sglang_dsv4.evals.run import gates_pass, table

ROOT = Path(__file__).resolve().parents[2]


def test_retrieval_prompts_have_the_length_and_the_fact():
    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    prompts = build_prompts(tok, 2048, 3, seed=0)
    for p in prompts:
        text = tok.decode(p["ids"])
        assert len(p["ids"]) == 2048 and len(p["answer"]) == 1
        assert f"The secret word of {p['key']} is {p['value']}." in text
        assert text.endswith(f"The secret word of {p['key']} is")
        assert tok.decode(p["answer"]) == " " + p["value"]


def test_a_failed_or_missing_gate_fails_the_run():
    report = {"gates": {"a": {"value": 0.5, "limit": 0.1, "pass": False}, "b": {"pass": True}}}
    assert not gates_pass(report)
    assert not gates_pass({"gates": {}})
    report["gates"]["a"]["pass"] = True
    assert gates_pass(report)


@pytest.mark.server
def test_run_eval_quick_passes_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", "scripts/run_eval.sh", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert set(report["gates"]) == {"ppl_vs_hf", "decode_kl_plain", "decode_kl_cache_hit"}
    ppl = report["perplexity"]
    assert ppl["server"]["tokens"] == ppl["hf_fp32"]["tokens"] == 2 * 383
    assert report["meta"]["server_dtype"] == "float32"
    # fp32 server vs fp32 HF token by token (a c4 top-k near-tie may move a single token)
    assert ppl["tokens_over_1e-3"] <= 3 and ppl["top1_agree"] >= 0.99
    assert ppl["server"]["ppl"] < 1000  # a trained model (uniform would be 6144)
    assert all(c > 0 for c in report["consistency"]["cache_hit"]["cached_tokens"])
    assert report["retrieval"]["per_length"]["2048"]["n"] == 1
    assert "gsm8k" in report["skipped"] and "gsm8k" not in report
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    assert "ALL GATES PASS" in proc.stdout and table(report) in proc.stdout
