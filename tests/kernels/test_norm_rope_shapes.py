"""``kernels.norm_rope_shapes``: the pick of ``rms_rope_``'s launch shape from the measured
table (the default below the smallest measured row count, for unmeasured keys and for
non-2-byte activations; the largest measured row count not above the call's otherwise), the
table's own rows, that every candidate's norm splits rows as the default does on sm_90, and
that every candidate gives the default shape's bits (in place: against a copy run with the
default).

CPU: interpreted, small shapes, fp32 and bf16. GPU: the served uses at T 1 / 32 / 128 / 8192
(64 heads: q norm + RoPE [T, 64, 512], the output's inverse RoPE [T, 64, 512], the indexer's
RoPE [T, 64, 128]) and the weighted KV norm + RoPE [T, 512], every candidate bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_dsv4.config import RopeSpec, YarnSpec
from sglang_dsv4.kernels import norm_rope as K
from sglang_dsv4.kernels.norm_rope_shapes import (
    CANDIDATES,
    MEASURED,
    RopeShape,
    default_shape,
    rope_shape,
)
from sglang_dsv4.ref.rope import rope_inv_freq

YARN = RopeSpec(160000.0, YarnSpec(16.0, 65536, 32.0, 1.0))
ROWS = ((512, True, 4096, RopeShape(8, 4), 30.0), (512, True, 65536, RopeShape(16, 8), 300.0),
        (128, False, 64, RopeShape(8, 1), 3.0))  # fmt: skip
# (name, heads, D, norm, weighted, inverse): the served uses (and KV, norm key of q)
USES = [("q", 64, 512, True, False, False), ("o inverse", 64, 512, False, False, True),
        ("indexer q", 64, 128, False, False, False), ("kv", 0, 512, True, True, False)]  # fmt: skip


def test_defaults_are_todays_shapes():
    assert default_shape(512, True) == RopeShape(4, 4) == CANDIDATES[(512, True)][0]
    assert default_shape(128, True) == RopeShape(16, 4)
    assert default_shape(512, False) == RopeShape(32, 4) == CANDIDATES[(128, False)][0]
    assert rope_shape(10**7, 256, True, True, measured=()) == RopeShape(8, 4)


def test_measured_rows_apply_from_their_row_count_per_key_to_two_byte_activations():
    assert rope_shape(4095, 512, True, True, measured=ROWS) == default_shape(512, True)
    assert rope_shape(4096, 512, True, True, measured=ROWS) == RopeShape(8, 4)
    assert rope_shape(10**6, 512, True, True, measured=ROWS) == RopeShape(16, 8)
    assert rope_shape(10**6, 512, False, True, measured=ROWS) == default_shape(512, False)
    assert rope_shape(64, 128, False, True, measured=ROWS) == RopeShape(8, 1)
    assert rope_shape(10**6, 512, True, False, measured=ROWS) == default_shape(512, True)  # fp32


def test_table_rows_are_candidates():
    """Every MEASURED row names a candidate of its key (those checked bit for bit here)."""
    for d, norm, n_rows, shape, us in MEASURED:
        assert shape in CANDIDATES[(d, norm)] and n_rows > 0 and us > 0


def test_every_candidate_splits_the_norms_rows_as_the_default_on_sm90():
    """``scripts/compile_ops_sm90.py --rope-shapes``: compiled for sm_90 (a subprocess: this
    one's kernels are interpreted), every candidate's norm sums a row in the default's split
    (channels per thread, lanes, warps), so in the same order, and none spills."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, str(root / "scripts/compile_ops_sm90.py"),
                          "--rope-shapes"], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    lines = [x for x in run.stdout.splitlines() if x.startswith("D ")]
    assert len(lines) >= sum(map(len, CANDIDATES.values())) + len(CANDIDATES[(512, True)])
    assert sum("row split (8, 32, 2)" in x for x in lines) == 2 * len(CANDIDATES[(512, True)])
    assert all("LOCAL:0" in x for x in lines)


def _inputs(use, t: int, dtype, device):
    _, heads, d, norm, weighted, inverse = use
    g = torch.Generator(device=device).manual_seed(t)
    shape = (t, heads, d) if heads else (t, d)
    x = (torch.randn(*shape, generator=g, device=device) * 3).to(dtype)
    w = (torch.rand(d, generator=g, device=device) + 0.5).to(dtype) if weighted else None
    pos = torch.randint(0, 1 << 20, (t,), generator=g, device=device)
    kw = dict(norm=norm, weight=w, inverse=inverse)
    return x, pos, rope_inv_freq(YARN, 64).to(device), kw


def _every_candidate_same_bits(use, t: int, dtype, device) -> int:
    x, pos, inv_freq, kw = _inputs(use, t, dtype, device)
    key = (use[2], use[3])
    want = K.rms_rope_(x.clone(), pos, inv_freq, shape=default_shape(*key), **kw)
    assert not torch.equal(want, x)  # the op did something
    for shape in CANDIDATES[key]:
        got = K.rms_rope_(x.clone(), pos, inv_freq, shape=shape, **kw)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (use[0], t, shape)
    return len(CANDIDATES[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use", USES, ids=[u[0] for u in USES])
def test_every_candidate_same_bits_interpreted(use, dtype):
    if torch.cuda.is_available():
        pytest.skip("interpreter shapes")
    small = (use[0], min(use[1], 3), *use[2:])  # 3 heads: rows of a program span tokens
    assert _every_candidate_same_bits(small, 5, dtype, "cpu") >= 9


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32, 128, 8192])
@pytest.mark.parametrize("use", USES, ids=[u[0] for u in USES])
def test_gpu_every_candidate_same_bits(use, t):
    assert _every_candidate_same_bits(use, t, torch.bfloat16, "cuda") >= 9
