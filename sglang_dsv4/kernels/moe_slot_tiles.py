"""Launch shapes of the slot (GEMV) form of the MoE kernels,
:func:`~sglang_dsv4.kernels.moe_experts.moe_experts_slots`: N and K tiles per kernel from the
token-slot count -- the measured rows of ``MEASURED`` where a call's shape has one (``python
scripts/bench_moe.py --shapes served --formats bf16,fp8 --sweep --tokens 1,2,4`` prints them),
else a guess from the HBM model.
"""

from typing import NamedTuple

import triton

__all__ = ["MEASURED", "SlotTiles", "slot_tiles"]


class SlotTiles(NamedTuple):
    """Launch shape of the slot kernels: N and K tiles of the w1/w3 kernel (``block_i``,
    ``k_i``) and of the w2 kernel (``block_d``, ``k_d``), warps and K-loop unroll factor of
    both (unrolled, the compiler may issue the next tile's loads before this tile's FMAs;
    ``num_stages`` does not pipeline these loads: they feed no ``tl.dot``)."""

    block_i: int
    k_i: int
    block_d: int
    k_d: int
    warps: int = 4
    unroll: int = 1


_SMS = 132  # H100 SXM; the tile choice only needs the order of magnitude
_PER_THREAD = 32  # fp32 accumulator elements per thread and weight: no spills on sm_90


# (bank format, token-slot pairs, tokens, inter, d) -> the fastest tiles of the sweep on the
# GPU, printed by ``bench_moe.py --sweep`` (empty until a sweep has run: every shape guesses)
MEASURED: dict[tuple[str, int, int, int, int], SlotTiles] = {}


def slot_tiles(fmt: str, pairs: int, tokens: int, inter: int, d: int, warps: int = 4,
               measured: bool = True) -> SlotTiles:  # fmt: skip
    """Slot-kernel tiles: the measured row of this shape (``measured``), else the guess
    (:func:`_guess`: its w2 N tile, warps and unroll depend on ``tokens`` and ``d`` alone, which a
    routed bank and a shared bank of its own launched together must share)."""
    row = MEASURED.get((fmt, pairs, tokens, inter, d)) if measured else None
    return row if row is not None else _guess(pairs, tokens, inter, d, warps)


def _guess(pairs: int, tokens: int, inter: int, d: int, warps: int) -> SlotTiles:
    """At batch 1 the grid is pairs x N / BLOCK_N programs: narrow N tiles
    (down to 4 rows) so that a few experts still give >= ~3 programs per SM; each tile holds
    32 weights per thread (several 16-byte loads in flight per thread and weight), its K width
    what the N tile leaves. A guess from the HBM model."""
    elems = _PER_THREAD * 32 * warps
    block_i = next((b for b in (32, 16, 8) if pairs * -(-inter // b) >= 3 * _SMS), 4)
    block_d = next((b for b in (32, 16, 8) if tokens * -(-d // b) >= 2 * _SMS), 4)
    k_i = min(elems // block_i, triton.next_power_of_2(d))
    k_d = min(elems // block_d, triton.next_power_of_2(inter))
    return SlotTiles(block_i, max(k_i, 64), block_d, max(k_d, 64), warps, 1)
