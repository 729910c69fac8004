"""scripts/bench_layer_host.py: the Python profile of one step (families, top functions)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from sglang_dsv4.ref.quant import hadamard  # some code of ours to profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_layer_host  # a script: importable once scripts/ is on the path


def test_py_profile_splits_own_time_by_family():
    """A step that runs our code and torch ops: our functions land in ``sglang_dsv4``, the ops
    in C calls, and the top list names our function with its calls."""
    host = SimpleNamespace(extend_batch=lambda b, n: torch.randn(b * n, 64))

    def step(x):
        for _ in range(20):
            hadamard(x)

    got = bench_layer_host.py_profile(host, step, 2, 8, top=50)
    fam = got["families_ms"]
    assert fam["sglang_dsv4"] > 0 and fam["C calls"] > 0
    ours = [r for r in got["top"] if r["fn"].endswith(" hadamard")]
    assert len(ours) == 1 and ours[0]["calls"] == 20 and ours[0]["cum_ms"] >= ours[0]["own_ms"]
