"""``kernels.topk_shapes``: the default is what the extend select ran before (the radix kernel,
steps as wide as the rows up to 2048), the candidates the sweep times, and the pick from the
measured table (the default below the smallest measured width and for other top-k; the widest
measured row not above the plan's that can run it; a rows shape never past ``MAX_ROW``)."""

from sglang_dsv4.kernels.topk_shapes import (
    MAX_ROW,
    MEASURED,
    SelectShape,
    candidates,
    default_shape,
    fits,
    radix_chunk,
    select_shape,
)

ROWS8 = SelectShape("rows", 8, 1024)
TABLE = ((1024, 512, SelectShape("rows", 4, 512), 90.0), (4096, 512, ROWS8, 300.0),
         (16384, 512, SelectShape("rows", 16, 2048), 900.0),
         (8192, 1024, SelectShape("radix", 8, 1024), 700.0))  # fmt: skip


def test_default_is_the_radix_select():
    assert default_shape(16) == SelectShape("radix", 8, 256)
    assert default_shape(1024) == SelectShape("radix", 8, 1024)
    assert default_shape(1040) == SelectShape("radix", 8, 2048)
    assert default_shape(1 << 20) == SelectShape("radix", 8, 2048)
    assert radix_chunk(300) == 512


def test_candidates():
    """The default first; rows shapes only for rows that fit, 4-64 entries per thread."""
    for ld in (1024, 2048, 4096, 8192, 16384, 32768):
        c = candidates(ld)
        assert c[0] == default_shape(ld) and len(set(c)) == len(c)
        rows = [s for s in c if s.kind == "rows"]
        assert bool(rows) == (ld <= MAX_ROW)
        row = 1 << (ld - 1).bit_length()
        assert all(4 <= row // (32 * s.warps) <= 64 and s.chunk == 128 * s.warps for s in rows)
    assert SelectShape("radix", 8, 2048) in candidates(1024)
    assert [s.warps for s in candidates(8192) if s.kind == "rows"] == [4, 8, 16]
    assert [s.warps for s in candidates(16384) if s.kind == "rows"] == [8, 16]


def test_pick_from_the_table():
    assert select_shape(1008, 512, TABLE) == default_shape(1008)  # below the smallest
    assert select_shape(1024, 512, TABLE) == SelectShape("rows", 4, 512)
    assert select_shape(6144, 512, TABLE) == ROWS8
    assert select_shape(16384, 512, TABLE) == SelectShape("rows", 16, 2048)
    # past MAX_ROW no rows shape runs: the widest measured one that can, else the default
    assert select_shape(16400, 512, TABLE) == default_shape(16400)
    assert select_shape(9000, 1024, TABLE) == SelectShape("radix", 8, 1024)
    assert select_shape(9000, 2048, TABLE) == default_shape(9000)  # top-k never measured
    assert select_shape(9000, 512, ()) == default_shape(9000)


def test_measured_rows_are_candidates():
    for ld, topk, shape, us in MEASURED:
        assert shape in candidates(ld) and fits(shape, ld) and topk > 0 and us > 0
