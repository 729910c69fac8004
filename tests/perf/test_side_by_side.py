"""``scripts/side_by_side.py``: the time its timed runs leave for the profiles asked for."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import side_by_side  # a script: importable once scripts/ is on the path


@pytest.mark.parametrize(
    "bs, prefill, want",
    [("", "", 0.0), ("1", "", 50.0), ("1,32", "4096x16", 140.0), ("", "4096x16,2048x8", 80.0)],
)
def test_profile_reserve_covers_each_profiles_own_minimum(bs, prefill, want):
    args = argparse.Namespace(profile_bs=bs, profile_prefill=prefill)
    got = side_by_side.profile_reserve_s(args)
    assert got == want
    # profile() / profile_prefill() skip below 45 s per batch size / 30 s per prefill cell: the
    # reserve must leave at least that, or asking for a profile would still skip it
    n_bs = len([b for b in bs.split(",") if b])
    n_pre = len([c for c in prefill.split(",") if c])
    assert got >= 45 * n_bs + 30 * n_pre
