"""The FP8 KV row layout of FlashMLA's DSV4 kernels: one 584-byte record per raw token or entry.

``[0, 448)``   nope channels, float8 e4m3, each 64-channel block divided by its scale
``[448, 576)`` RoPE channels, 64 x bf16
``[576, 583)`` one UE8M0 scale per nope block (the byte is the biased exponent: 2^(b - 127))
``[583]``      padding

Packing rounds exactly like the reference's FP8 KV simulation (``quant.kv_fake_quant``), so
``unpack(pack(kv))`` equals ``kv_fake_quant(kv)`` with the RoPE channels rounded to bf16.
"""

import torch

from sglang_dsv4.ref.quant import FP8_E4M3_MAX, ue8m0_scale

__all__ = ["fp8_row_bytes", "pack_fp8_rows", "unpack_fp8_rows"]

_BLOCK = 64


def fp8_row_bytes(head_dim: int = 512, rope_dim: int = 64) -> int:
    nope = head_dim - rope_dim
    return nope + 2 * rope_dim + nope // _BLOCK + 1


def pack_fp8_rows(kv: torch.Tensor, rope_dim: int = 64) -> torch.Tensor:
    """``kv`` [N, D] (any float dtype) -> uint8 [N, fp8_row_bytes(D, rope_dim)]."""
    n, d = kv.shape
    nope_dim = d - rope_dim
    if nope_dim % _BLOCK:
        raise ValueError(f"nope dims {nope_dim} are not a multiple of {_BLOCK}")
    nope = kv[:, :nope_dim].float().unflatten(-1, (-1, _BLOCK))  # [N, B, 64]
    scale = ue8m0_scale(nope.abs().amax(-1, keepdim=True), FP8_E4M3_MAX)  # [N, B, 1]
    q = (nope / scale).to(torch.float8_e4m3fn).view(torch.uint8).flatten(1)  # [N, nope]
    rope = kv[:, nope_dim:].to(torch.bfloat16).contiguous().view(torch.uint8)  # [N, 2*rope]
    exp = (torch.log2(scale.squeeze(-1)).round() + 127).to(torch.uint8)  # [N, B]
    pad = torch.zeros(n, 1, dtype=torch.uint8, device=kv.device)
    return torch.cat([q, rope, exp, pad], dim=1)


def unpack_fp8_rows(rows: torch.Tensor, head_dim: int = 512, rope_dim: int = 64) -> torch.Tensor:
    """uint8 [N, fp8_row_bytes] -> fp32 [N, head_dim]."""
    nope_dim = head_dim - rope_dim
    n_blocks = nope_dim // _BLOCK
    if rows.shape[-1] != fp8_row_bytes(head_dim, rope_dim):
        raise ValueError(
            f"rows of {rows.shape[-1]} bytes, expected {fp8_row_bytes(head_dim, rope_dim)}"
        )
    q = rows[:, :nope_dim].contiguous().view(torch.float8_e4m3fn).float()
    rope = rows[:, nope_dim : nope_dim + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    exp = rows[:, nope_dim + 2 * rope_dim : nope_dim + 2 * rope_dim + n_blocks].float()
    nope = q.unflatten(-1, (n_blocks, _BLOCK)) * torch.exp2(exp - 127).unsqueeze(-1)
    return torch.cat([nope.flatten(1), rope], dim=1)
