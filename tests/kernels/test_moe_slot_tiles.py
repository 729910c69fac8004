"""``kernels.moe_slot_tiles``: the slot form's launch shape fills the GPU at batch 1."""

from sglang_dsv4.kernels.moe_slot_tiles import slot_tiles


def test_slot_tiles_fill_the_gpu_at_batch_1():
    """Batch 1 of the served shape (3 slots of 1024 rows): narrow N tiles, >= 3 programs per
    SM in the w1/w3 kernel, 32 weights per thread."""
    tiles = slot_tiles("dense", 3, 1, 1024, 4096)
    assert 3 * 1024 // tiles.block_i >= 3 * 132
    assert tiles.block_i * tiles.k_i == tiles.block_d * tiles.k_d == 32 * 32 * tiles.warps
