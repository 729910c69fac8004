"""RMSNorm and RoPE of the attention's activations as single Triton launches.

* :func:`rms_norm`: ``ref.norm.rms_norm(x, w)`` of rows [N, n] (``q_norm`` after ``wq_a``);
  ``n`` need not be a power of 2 (Pro's ``q_lora_rank`` is 1536).
* :func:`rms_rope_`: in place on heads ``x`` [T, H, D] (or [T, D]): optional RMSNorm over each
  head (weighted or not) then RoPE of its last 64 channels at the token's position, forward or
  inverse -- the query after ``wq_b`` (unweighted norm + RoPE), the raw KV (``kv_norm`` + RoPE),
  the indexer query (RoPE only) and the attention output (inverse RoPE only). Without the norm
  only the 64 RoPE channels are read and written.

The RoPE angles are computed in the kernel (``pos * inv_freq``, fp32, as
``ref.rope.rope_cos_sin``); the inverse rotation is the rotation at ``-pos`` (cos even, sin odd:
the same values as ``ref``'s negated sine). bf16 values are rounded where ``ref`` rounds them
(the normed value, the weighted product, the rotated pairs). Shared helpers:
:mod:`sglang_dsv4.kernels.kv_store`.
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import (
    hadamard_rows,
    norm_apply,
    rms_inv,
    rope_rows,
    round_bf16,
)
from sglang_dsv4.kernels.norm_rope_shapes import RopeShape, rope_shape

__all__ = ["rms_norm", "rms_rope_", "rope_hadamard_"]

_ROPE = 64  # RoPE channels (32 pairs): the helpers in kv_store are written for 64


@triton.jit(do_not_specialize=["n_rows"])
def _rms_kernel(
    x_ptr, w_ptr, out_ptr, n_rows, x_stride, eps,
    N: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr, X_BF16: tl.constexpr, W_BF16: tl.constexpr,
):  # fmt: skip
    r = (tl.program_id(0) * RB + tl.arange(0, RB)).to(tl.int64)
    cols = tl.arange(0, BN)
    ok = (r < n_rows)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + r[:, None] * x_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0)
    y = norm_apply(x, rms_inv(x, eps, N), w, X_BF16, W_BF16)  # rms_inv divides by N, not BN
    tl.store(out_ptr + r[:, None] * N + cols[None, :], y, mask=ok)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``ref.norm.rms_norm(x, w, eps)`` of ``x`` [N, n] (rows may be strided) -> new [N, n]."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"rows [N, n] contiguous in n expected, got {tuple(x.shape)}")
    n_rows, n = x.shape
    dtype = x.dtype if w.dtype == x.dtype else torch.promote_types(x.dtype, w.dtype)  # (an op)
    out = torch.empty(n_rows, n, dtype=dtype, device=x.device)
    if n_rows == 0:
        return out
    bn = triton.next_power_of_2(n)
    rb = max(1, min(16, 4096 // bn))
    x_bf16 = x.dtype == torch.bfloat16
    _rms_kernel[(triton.cdiv(n_rows, rb),)](
        x_ptr=x, w_ptr=w, out_ptr=out, n_rows=n_rows, x_stride=x.stride(0), eps=eps,
        N=n, BN=bn, RB=rb, X_BF16=x_bf16, W_BF16=x_bf16 and w.dtype == torch.bfloat16,
        num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _scale_rows(x, inv, w, HAS_W: tl.constexpr, X_BF16: tl.constexpr, W_BF16: tl.constexpr):
    """``rms_norm``'s output from ``x`` [RB, K] and ``1 / rms`` [RB] (weight ``w`` [K])."""
    if HAS_W:
        return norm_apply(x, inv, w, X_BF16, W_BF16)
    y = x * inv[:, None]
    return round_bf16(y) if X_BF16 else y


@triton.jit(do_not_specialize=["n_rows"])
def _rms_rope_kernel(
    x_ptr, w_ptr, pos_ptr, inv_freq_ptr, n_rows, n_heads, stride_t, stride_h, eps,
    D: tl.constexpr, RB: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
    INVERSE: tl.constexpr, X_BF16: tl.constexpr, W_BF16: tl.constexpr,
):  # fmt: skip
    """Rows = (token, head) pairs: with ``NORM`` the whole head row is loaded once (vector
    loads), normed and rotated in registers; without, only its last 64 channels."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    ok = (r < n_rows)[:, None]
    t = r // n_heads
    base = x_ptr + t.to(tl.int64)[:, None] * stride_t + (r % n_heads)[:, None] * stride_h
    pos = tl.load(pos_ptr + t, mask=r < n_rows, other=0)
    pos = -pos if INVERSE else pos
    W: tl.constexpr = D if NORM else 64  # channels read and written
    cols = D - W + tl.arange(0, W)
    x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)  # [RB, W]
    if NORM:
        w = tl.load(w_ptr + cols) if HAS_W else cols
        x = _scale_rows(x, rms_inv(x, eps, D), w, HAS_W, X_BF16, W_BF16)
    x = rope_rows(x, pos, inv_freq_ptr, RB, W, X_BF16)
    tl.store(base + cols[None, :], x, mask=ok)


def rms_rope_(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    norm: bool = False,
    weight: torch.Tensor | None = None,
    inverse: bool = False,
    eps: float = 1e-6,
    shape: RopeShape | None = None,
) -> torch.Tensor:
    """In place on ``x`` [T, H, D] or [T, D] (channels contiguous): ``rms_norm(x, weight)``
    over each head when ``norm``, then RoPE (``inverse``: the inverse rotation) of the last 64
    channels at ``positions`` [T] with ``inv_freq`` [32] (fp32). ``shape``: the launch shape
    (default :func:`~sglang_dsv4.kernels.norm_rope_shapes.rope_shape`, the same bits whatever
    it is). Returns ``x``."""
    heads = x.unsqueeze(1) if x.dim() == 2 else x
    if heads.dim() != 3 or heads.stride(2) != 1:
        raise ValueError(f"[T, H, D] or [T, D] with contiguous channels expected, {x.shape}")
    n, n_heads, d = heads.shape
    if d < _ROPE or d & (d - 1) or inv_freq.numel() != _ROPE // 2:
        raise ValueError(f"head dim {d}: a power of 2 >= 64 with 32 inverse frequencies needed")
    if weight is not None and not norm:
        raise ValueError("a norm weight without norm=True")
    if n == 0 or n_heads == 0:
        return x
    shape = shape or rope_shape(n * n_heads, d, norm, x.element_size() == 2)
    x_bf16 = x.dtype == torch.bfloat16
    _rms_rope_kernel[(triton.cdiv(n * n_heads, shape.rows),)](
        x_ptr=heads, w_ptr=weight if weight is not None else heads, pos_ptr=positions,
        inv_freq_ptr=inv_freq, n_rows=n * n_heads, n_heads=n_heads, stride_t=heads.stride(0),
        stride_h=heads.stride(1), eps=eps, D=d, RB=shape.rows, NORM=norm,
        HAS_W=weight is not None, INVERSE=inverse, X_BF16=x_bf16,
        W_BF16=x_bf16 and weight is not None and weight.dtype == torch.bfloat16,
        num_warps=shape.warps,
    )  # fmt: skip
    return x


@triton.jit(do_not_specialize=["n_rows"])
def _rope_hadamard_kernel(
    x_ptr, pos_ptr, inv_freq_ptr, n_rows, n_heads, stride_t, stride_h,
    D: tl.constexpr, LOG2D: tl.constexpr, RB: tl.constexpr, INVERSE: tl.constexpr,
    X_BF16: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    ok = (r < n_rows)[:, None]
    t = r // n_heads
    base = x_ptr + t.to(tl.int64)[:, None] * stride_t + (r % n_heads)[:, None] * stride_h
    cols = tl.arange(0, D)[None, :]
    x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)  # [RB, D]
    pos = tl.load(pos_ptr + t, mask=r < n_rows, other=0)
    pos = -pos if INVERSE else pos
    x = hadamard_rows(rope_rows(x, pos, inv_freq_ptr, RB, D, X_BF16), RB, D, LOG2D)
    tl.store(base + cols, round_bf16(x) if X_BF16 else x, mask=ok)


def rope_hadamard_(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, inverse: bool = False
) -> torch.Tensor:
    """In place on ``x`` [T, H, D]: RoPE (``inverse``: the inverse rotation) of the last 64
    channels, then the Walsh-Hadamard rotation of each head (``ref.quant.hadamard``: queries of
    an indexer whose keys are stored rotated). Returns ``x``."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"[T, H, D] with contiguous channels expected, got {tuple(x.shape)}")
    n, n_heads, d = x.shape
    if d < _ROPE or d & (d - 1) or inv_freq.numel() != _ROPE // 2:
        raise ValueError(f"head dim {d}: a power of 2 >= 64 with 32 inverse frequencies needed")
    if n == 0 or n_heads == 0:
        return x
    rb = max(1, 2048 // d)
    _rope_hadamard_kernel[(triton.cdiv(n * n_heads, rb),)](
        x_ptr=x, pos_ptr=positions, inv_freq_ptr=inv_freq, n_rows=n * n_heads, n_heads=n_heads,
        stride_t=x.stride(0), stride_h=x.stride(1), D=d, LOG2D=d.bit_length() - 1, RB=rb,
        INVERSE=inverse, X_BF16=x.dtype == torch.bfloat16, num_warps=4,
    )  # fmt: skip
    return x
