"""``kernels.moe_slot_tiles``: the slot form's launch shape fills the GPU at batch 1."""

from sglang_dsv4.kernels.moe_slot_tiles import slot_tiles


def test_slot_tiles_fill_the_gpu_at_batch_1():
    """Batch 1 of the served shape (3 slots of 1024 rows): narrow N tiles, >= 3 programs per
    SM in the w1/w3 kernel, 32 weights per thread."""
    tiles = slot_tiles("dense", 3, 1, 1024, 4096)
    assert 3 * 1024 // tiles.block_i >= 3 * 132
    assert tiles.block_i * tiles.k_i == tiles.block_d * tiles.k_d == 32 * 32 * tiles.warps


def test_a_measured_row_serves_its_shape_and_only_when_asked(monkeypatch):
    from sglang_dsv4.kernels import moe_slot_tiles as M

    row = M.SlotTiles(8, 512, 16, 256, 8, 2)
    monkeypatch.setitem(M.MEASURED, ("dense", 3, 1, 1024, 4096), row)
    assert M.slot_tiles("dense", 3, 1, 1024, 4096) == row
    guess = M.slot_tiles("dense", 3, 1, 1024, 4096, measured=False)
    assert guess != row and guess == M.slot_tiles("fp8", 3, 1, 1024, 4096)  # other key: guess


def test_the_sweep_prints_the_fastest_pair_sharing_warps_and_unroll():
    """``bench_moe.measured_rows``: per shape, the w1/w3 and w2 tiles whose sum is fastest
    among those with the same warps and unroll (the two kernels of one ``SlotTiles``)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bench_moe import measured_rows

    key = ["dense", 3, 1, 1024, 4096]

    def row(kernel, tiles, us):
        n, k = (tiles[0], tiles[1]) if kernel == "w13" else (tiles[2], tiles[3])
        tag = f"_n{n}_k{k}_w{tiles[4]}_u{tiles[5]}"
        return {"case": f"slots_{kernel}{tag}", "us": us, "slot_key": key, "tiles": tiles}

    results = [
        {"case": "slots_w13", "us": 30.0, "slot_key": key, "tiles": [4, 1024, 8, 512, 4, 1]},
        {"case": "slots_w2", "us": 15.0, "slot_key": key, "tiles": [4, 1024, 8, 512, 4, 1]},
        row("w13", [8, 512, 8, 512, 4, 1], 20.0),
        row("w2", [8, 512, 8, 512, 4, 1], 14.0),
        row("w13", [16, 256, 16, 256, 4, 1], 25.0),
        row("w2", [16, 256, 16, 256, 4, 1], 9.0),  # best w2 with warps 4 / unroll 1
        row("w13", [4, 2048, 4, 1024, 8, 2], 18.0),  # fastest w13, but its w2 is slow
        row("w2", [4, 2048, 4, 1024, 8, 2], 30.0),
    ]
    (line,) = measured_rows(results)
    assert line.strip().startswith("('dense', 3, 1, 1024, 4096): SlotTiles(8, 512, 16, 256, 4, 1)")
    assert "29.0 us (default tiles 45.0)" in line
