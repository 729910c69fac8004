import pytest

from sglang_dsv4.attention import choice
from sglang_dsv4.attention.choice import CUTE, FLASHMLA, OURS, flashmla_eligible, pick
from sglang_dsv4.config import AttnKind


def test_ours_where_flashmla_cannot_run():
    assert pick("csa", 64, 32, 640, eligible=False) == OURS
    assert pick("csa", 4, 32, 144, eligible=True) == OURS  # no measured row for 4 heads
    assert not flashmla_eligible(True, 64, 512, "cpu")
    assert not flashmla_eligible(False, 64, 512, "cpu")


@pytest.mark.parametrize(
    ("kind", "heads", "batch", "keys"), [("csa", 64, 128, 640), ("hca", 128, 1, 1152)]
)
def test_the_faster_measured_kernel(kind, heads, batch, keys):
    row = next(r for r in choice.MEASURED if r[:4] == (kind, heads, batch, keys))
    want = OURS if row[4] <= row[5] else FLASHMLA
    assert pick(kind, heads, batch, keys, eligible=True) == want


def test_nearest_row_decides(monkeypatch):
    table = (("hca", 64, 1, 160, 5.0, 10.0), ("hca", 64, 128, 1152, 80.0, 40.0))
    monkeypatch.setattr(choice, "MEASURED", table)
    assert pick("hca", 64, 2, 200, eligible=True) == OURS
    assert pick("swa", 64, 1, 128, eligible=True) == OURS  # SWA-only lists use the hca rows
    assert pick("hca", 64, 100, 1000, eligible=True) == FLASHMLA


def test_layer_kinds_name_their_rows():
    # measured: FlashMLA faster at CSA Flash batch 128 and HCA batch 1
    assert pick(AttnKind.CSA, 64, 128, 640, eligible=True) == FLASHMLA
    assert pick(AttnKind.SWA, 64, 1, 128, eligible=True) == FLASHMLA
    assert pick(AttnKind.HCA, 64, 1, 192, eligible=True) == FLASHMLA


def test_cute_never_picked_without_a_measured_row():
    assert choice.CUTE_MEASURED == ()  # nothing measured yet: the CuTe kernel must not serve
    for kind, heads, batch, keys, *_ in choice.MEASURED:
        assert pick(kind, heads, batch, keys, eligible=True, cute=True) != CUTE
        assert pick(kind, heads, batch, keys, eligible=False, cute=True) == OURS


def test_cute_picked_only_where_its_row_wins(monkeypatch):
    table = (("csa", 64, 1, 640, 19.7, 12.7), ("csa", 64, 128, 640, 111.9, 47.2))
    monkeypatch.setattr(choice, "MEASURED", table)
    monkeypatch.setattr(choice, "CUTE_MEASURED", (("csa", 64, 128, 640, 40.0),))
    assert pick("csa", 64, 128, 640, eligible=True, cute=True) == CUTE
    assert pick("csa", 64, 100, 600, eligible=True, cute=True) == CUTE  # nearest row: 128 x 640
    assert pick("csa", 64, 1, 640, eligible=True, cute=True) == FLASHMLA  # no CuTe time there
    assert pick("csa", 64, 128, 640, eligible=True, cute=False) == FLASHMLA  # cannot run
    monkeypatch.setattr(choice, "CUTE_MEASURED", (("csa", 64, 128, 640, 50.0),))
    assert pick("csa", 64, 128, 640, eligible=True, cute=True) == FLASHMLA  # slower: not picked
    assert pick("csa", 64, 128, 640, eligible=False, cute=True) == CUTE  # faster than ours
