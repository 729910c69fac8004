"""GSM8K (5-shot, completion API) through ``sglang.test.run_eval``, from a local test file (no
download). Meaningful only for a real DSV4 checkpoint: the tiny Shakespeare model cannot do
arithmetic, so the runner skips it there and says why.

The shipped ``data/gsm8k_test.jsonl`` holds only the first 15 lines of the GSM8K test split
(openai/grade-school-math, MIT): the 5 shots and 10 questions, a smoke sample. For a real score
pass the full ``test.jsonl`` (1319 lines) with ``--gsm8k-data``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

__all__ = ["DATA", "run_gsm8k"]

DATA = Path(__file__).resolve().parent / "data" / "gsm8k_test.jsonl"


def run_gsm8k(port: int, num_examples: int, log_path: Path, data: Path = DATA) -> dict:
    cmd = [sys.executable, "-m", "sglang.test.run_eval", "--eval-name", "gsm8k"]
    cmd += ["--host", "http://127.0.0.1", "--port", str(port), "--num-examples", str(num_examples)]
    cmd += ["--num-threads", "32", "--gsm8k-data-path", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=6 * 3600)
    log_path.write_text(proc.stdout + proc.stderr)
    score = re.search(r"^Score: ([0-9.]+)", proc.stdout, re.MULTILINE)
    if proc.returncode or score is None:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"sglang.test.run_eval gsm8k failed:\n{tail}")
    with open(data) as f:
        available = sum(1 for _ in f) - 5  # the first 5 lines are the shots
    return {"accuracy": float(score.group(1)), "n": min(num_examples, available)}
