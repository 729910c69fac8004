"""Quantized weight formats of DSV4 checkpoints: pack (quantize) and unpack (dequantize).

Weights are ``W [N, K]`` (``N`` outputs, ``K`` inputs, as ``nn.Linear`` stores them).

``fp8_block`` (the released linears)
    ``q`` float8_e4m3fn ``[N, K]`` and ``scale`` float8_e8m0fnu ``[ceil(N/128), ceil(K/128)]``:
    one power-of-2 (UE8M0) scale per 128x128 tile, ``scale = 2^ceil(log2(amax / 448))``;
    ``W = q * scale[n // 128, k // 128]``. Dimensions that are not multiples of 128 are *not*
    padded: the last row / column of tiles is partial and gets the scale of its own elements (the
    DeepSeek-V3 convention, e.g. its 576-row ``kv_a_proj_with_mqa`` has 5 scale rows).
``mxfp4`` (the released routed experts, OCP MXFP4)
    ``packed`` int8 ``[N, K/2]``: FP4 e2m1 codes (bit 3 = sign, bits 0-2 index
    :data:`~sglang_dsv4.ref.quant.E2M1_GRID`), two per byte, element ``2j`` in the low nibble;
    ``scale`` float8_e8m0fnu ``[N, K/32]``, ``2^ceil(log2(amax / 6))`` per 32 inputs;
    ``W[n, k] = e2m1(code[n, k]) * scale[n, k // 32]``.
``nvfp4`` (our option for routed experts)
    the same e2m1 nibbles in uint8 ``[N, K/2]``; ``scale`` float8_e4m3fn ``[N, K/16]`` (one per
    16 inputs) and one fp32 ``global_scale`` (a 0-d tensor, the dequantization multiplier,
    ``amax(W) / (448 * 6)``): ``W[n, k] = e2m1(code) * scale[n, k // 16] * global_scale``.

MXFP4 -> NVFP4 (:func:`nvfp4_from_mxfp4`) keeps the packed codes and re-expresses each power-of-2
group scale as two e4m3 block scales over a power-of-2 global scale: exact except for groups
more than 2^17 below the largest, which e4m3 cannot reach (they flush to zero).

Rounding is to nearest, ties to even, everywhere. Values that a format represents survive
``unpack(pack(W))`` exactly (for NVFP4 when the global scale is a power of 2).
"""

import torch

from sglang_dsv4.ref.quant import E2M1_GRID, E2M1_MAX, FP8_E4M3_MAX, ue8m0_scale

__all__ = [
    "FP8_BLOCK",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "e2m1_decode",
    "e2m1_encode",
    "fp4_grouped_linear",
    "fp8_block_dequant",
    "fp8_block_linear",
    "fp8_block_quant",
    "mxfp4_dequant",
    "mxfp4_quant",
    "nvfp4_dequant",
    "nvfp4_from_mxfp4",
    "nvfp4_quant",
    "pack_nibbles",
    "unpack_nibbles",
]

FP8_BLOCK = 128
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
# Midpoints between neighbouring E2M1_GRID magnitudes: the rounding boundaries.
_E2M1_MIDPOINTS = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
_E2M1_BY_CODE = torch.cat([E2M1_GRID, -E2M1_GRID])  # value of each 4-bit code


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 codes (uint8 in [0, 16)) of ``x`` (already scaled; |x| is clamped to 6)."""
    mag = x.float().abs().clamp(max=E2M1_MAX)
    mid = _E2M1_MIDPOINTS.to(x.device)
    code = torch.bucketize(mag, mid)  # number of midpoints < |x|
    # on a midpoint, searchsorted picked the lower code; ties go to the even code
    tie = (code < mid.numel()) & (mag == mid[code.clamp(max=mid.numel() - 1)]) & (code % 2 == 1)
    code = code + tie.long()
    sign = (x < 0) & (code > 0)  # no negative zero: code 8 never appears
    return (code + 8 * sign.long()).to(torch.uint8)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """fp32 values of FP4 e2m1 ``code`` (any integer dtype, low 4 bits used)."""
    return _E2M1_BY_CODE.to(code.device)[(code & 0xF).to(torch.int32)]


def pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] (values < 16) -> bytes uint8 [..., K/2], element 2j in the low nibble."""
    c = code.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] (int8 or uint8) -> codes uint8 [..., K]."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def _tiles(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """``w`` [N, K] zero-padded to multiples of ``block`` and viewed as tiles [n, b, k, b]."""
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    padded = w.float().new_zeros(rows * block, cols * block)
    padded[:n, :k] = w.float()
    return padded.view(rows, block, cols, block), n, k


def fp8_block_quant(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [N, K] -> (e4m3 [N, K], UE8M0 scales e8m0 [ceil(N/block), ceil(K/block)])."""
    tiles, n, k = _tiles(w, block)
    scale = ue8m0_scale(tiles.abs().amax(dim=(1, 3)), FP8_E4M3_MAX)  # [rows, cols]
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    q = q.view(scale.shape[0] * block, scale.shape[1] * block)[:n, :k].contiguous()
    return q, scale.to(torch.float8_e8m0fnu)


def fp8_block_dequant(
    q: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block: int = FP8_BLOCK,
) -> torch.Tensor:
    """e4m3 ``q`` [N, K] with e8m0 ``scale`` [ceil(N/b), ceil(K/b)] -> ``dtype`` [N, K]."""
    n, k = q.shape
    if tuple(scale.shape) != (-(-n // block), -(-k // block)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not tile [{n}, {k}] by {block}")
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    # one row of tiles at a time: temporaries stay at 128 rows whatever the weight's size
    for r, s in enumerate(scale.float()):
        rows = slice(r * block, (r + 1) * block)
        out[rows] = q[rows].float() * s.repeat_interleave(block)[:k]
    return out


def mxfp4_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [N, K] -> (packed int8 [N, K/2], UE8M0 scales e8m0 [N, K/32])."""
    wb = _groups(w, MXFP4_BLOCK)  # [N, K/32, 32]
    scale = ue8m0_scale(wb.abs().amax(-1), E2M1_MAX)  # [N, K/32]
    code = e2m1_encode(wb / scale.unsqueeze(-1)).flatten(-2)
    return pack_nibbles(code).view(torch.int8), scale.to(torch.float8_e8m0fnu)


def mxfp4_dequant(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """packed [N, K/2] with e8m0 ``scale`` [N, K/32] -> ``dtype`` [N, K]."""
    v = e2m1_decode(unpack_nibbles(packed)).unflatten(-1, (-1, MXFP4_BLOCK))
    return v.mul_(scale.float().unsqueeze(-1)).flatten(-2).to(dtype)


def nvfp4_quant(
    w: torch.Tensor, global_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [N, K] -> (packed uint8 [N, K/2], e4m3 scales [N, K/16], fp32 global scale [])."""
    wb = _groups(w, NVFP4_BLOCK)  # [N, K/16, 16]
    if global_scale is None:
        # the largest block scale lands on e4m3's max (448) so the block scales use its range
        global_scale = wb.abs().amax().clamp(min=2.0**-126) / (FP8_E4M3_MAX * E2M1_MAX)
    gs = torch.as_tensor(global_scale, dtype=torch.float32)
    scale = (wb.abs().amax(-1) / E2M1_MAX / gs).to(torch.float8_e4m3fn)  # [N, K/16]
    step = scale.float() * gs  # dequantization multiplier per block
    # blocks whose scale underflowed to 0 hold only values below e4m3's resolution: encode 0
    scaled = torch.where(step.unsqueeze(-1) > 0, wb / step.clamp(min=2.0**-149).unsqueeze(-1), 0.0)
    code = e2m1_encode(scaled).flatten(-2)
    return pack_nibbles(code), scale, gs


def nvfp4_dequant(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """packed [N, K/2], e4m3 ``scale`` [N, K/16], fp32 ``global_scale`` [] -> ``dtype`` [N, K]."""
    v = e2m1_decode(unpack_nibbles(packed)).unflatten(-1, (-1, NVFP4_BLOCK))
    step = scale.float() * global_scale.float()
    return v.mul_(step.unsqueeze(-1)).flatten(-2).to(dtype)


def nvfp4_from_mxfp4(
    packed: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 (packed [N, K/2], e8m0 ``scale`` [N, K/32]) -> NVFP4 of the same values (see the
    module docstring): the largest group scale becomes e4m3 256 = 2^8 (the top power of 2)."""
    log2 = torch.log2(scale.float())  # exact: e8m0 holds powers of 2
    gs = torch.exp2(log2.max() - 8)
    # groups below e4m3's smallest subnormal (2^-9) flush to zero
    block = torch.exp2(log2 - log2.max() + 8)
    block = block.repeat_interleave(MXFP4_BLOCK // NVFP4_BLOCK, dim=-1).to(torch.float8_e4m3fn)
    return packed.view(torch.uint8).clone(), block, gs


def fp8_block_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] @ dequant(``q``, ``scale``).T in fp32 -> ``x``'s dtype (the twin of
    :func:`sglang_dsv4.kernels.fp8_linear.fp8_block_linear`)."""
    return (x.float() @ fp8_block_dequant(q, scale).T).to(x.dtype)


def fp4_grouped_linear(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    fmt: str,
) -> torch.Tensor:
    """Rows ``x[offsets[e]:offsets[e+1]]`` times dequant(expert e).T, fp32 math -> ``x``'s dtype
    [R, N]; a bank is ``packed`` uint8 [E, N, K/2], ``scale`` uint8 [E, N, K/G] (e8m0 bytes for
    ``mxfp4``, e4m3 bytes for ``nvfp4``), ``global_scale`` fp32 [E] (twin of
    :func:`sglang_dsv4.kernels.mxfp4_moe.fp4_grouped_linear`)."""
    out = torch.empty(x.shape[0], packed.shape[1], dtype=x.dtype, device=x.device)
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        if fmt == "mxfp4":
            w = mxfp4_dequant(packed[e], scale[e].view(torch.float8_e8m0fnu))
        else:
            w = nvfp4_dequant(packed[e], scale[e].view(torch.float8_e4m3fn), global_scale[e])
        out[lo:hi] = (x[lo:hi].float() @ w.T).to(x.dtype)
    return out


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    if w.shape[-1] % group:
        raise ValueError(f"input dim {w.shape[-1]} is not a multiple of the group size {group}")
    return w.float().unflatten(-1, (-1, group))
