"""The sorted MoE form's slot sum as one Triton launch: ``out [T, d]`` = the sum of each token's
``S`` slot rows of ``y [T * S, d]`` (token order), bit for bit ``torch.sum(y.view(T, S, d),
dim=1, out=out)`` on CUDA -- the op it replaces (:func:`slot_sum_torch`, the twin and oracle).

torch's CUDA reduce (``at::native::reduce_kernel``, the slot sum of a [T, S, d] view reduces a
strided dim, so each thread owns an output and all its S inputs) accumulates bf16 / fp16 in fp32
in four accumulators (``vt0`` = 4: input ``j`` into accumulator ``j % 4``, each starting at 0),
combines them as ``((a0 + a1) + a2) + a3`` and rounds once to the output dtype. The kernel does
the same adds in the same order, so every S gives torch's bits; for S <= 4 this is the plain
in-order sum (torch on CPU sums in order: the same bits there up to S = 4). It reads y once and
writes out once (torch's strided reduce ran at ~half the H100's bandwidth at the served prefill
shape, 8K tokens x 3 slots x 4096).

``add`` [T, d] (a shared expert held in a bank of its own, :mod:`sglang_dsv4.ops.moe`): rows
added after the slot sum is rounded, with the bits of ``slot_sum(y) + add`` (torch's add: fp32,
one rounding), the launch it replaces. The sum is never -0 (its accumulators start at +0), so
``add`` gives the bits of its one-slot sum (``0 + add``) too.
"""

import torch
import triton
import triton.language as tl

from sglang_dsv4.kernels.kv_store import round_bf16

__all__ = ["BLOCK_D", "slot_sum", "slot_sum_torch"]

BLOCK_D = 1024  # channels per program: 2 KB of bf16 per slot row, 16-byte loads with 4 warps


@triton.jit
def round_out(s, out_ptr, OUT_BF16: tl.constexpr):
    """fp32 ``s`` rounded to out's dtype, as fp32 (RNE in the kernel for bf16: the interpreter's
    cast truncates)."""
    if OUT_BF16:
        return round_bf16(s)
    return s.to(out_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _slot_sum_kernel(y_ptr, add_ptr, out_ptr, D, SLOTS: tl.constexpr, BLOCK_D: tl.constexpr,
                     OUT_BF16: tl.constexpr, ADD: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    row = y_ptr + t * SLOTS * D + cols  # slot 0 of token t
    # torch's four accumulators, each from 0 (0 + -0 = +0, as torch's first add)
    a0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(SLOTS):
        v = tl.load(row + j * D, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_D]
        if j % 4 == 0:
            a0 = a0 + v
        elif j % 4 == 1:
            a1 = a1 + v
        elif j % 4 == 2:
            a2 = a2 + v
        else:
            a3 = a3 + v
    s = ((a0 + a1) + a2) + a3
    if ADD:  # the rounded sum + add (module docstring)
        extra = tl.load(add_ptr + t * D + cols, mask=ok, other=0.0).to(tl.float32)
        s = round_out(s, out_ptr, OUT_BF16) + extra
    s = round_bf16(s) if OUT_BF16 else s  # RNE in the kernel: the interpreter's cast truncates
    tl.store(out_ptr + t * D + cols, s.to(out_ptr.dtype.element_ty), mask=ok)


def slot_sum(y: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, d] = the sum over slots of y [T * S, d] (+ ``add`` [T, d]; all contiguous, add in
    out's dtype; module docstring)."""
    t, d = out.shape
    slots = y.shape[0] // max(t, 1)
    if y.dim() != 2 or y.shape[1] != d or y.shape[0] != t * slots or (t and not slots):
        raise ValueError(f"y [T * S, d] for out [T, d] expected, got {tuple(y.shape)}, {(t, d)}")
    if add is not None and (add.shape != out.shape or add.dtype != out.dtype):
        raise ValueError(f"add {tuple(add.shape)} {add.dtype} for out {(t, d)} {out.dtype}")
    if not (y.is_contiguous() and out.is_contiguous() and (add is None or add.is_contiguous())):
        raise ValueError("y, out and add must be contiguous")
    if t == 0:
        return out
    _slot_sum_kernel[(t, triton.cdiv(d, BLOCK_D))](
        y_ptr=y, add_ptr=y if add is None else add, out_ptr=out, D=d, SLOTS=slots,
        BLOCK_D=BLOCK_D, OUT_BF16=out.dtype == torch.bfloat16, ADD=add is not None, num_warps=4,
    )  # fmt: skip
    return out


def slot_sum_torch(
    y: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None
) -> torch.Tensor:
    """The twin: torch's sum of the [T, S, d] view into out (fp32 accumulation, one rounding),
    then ``add`` added (module docstring)."""
    t, d = out.shape
    torch.sum(y.view(t, -1, d), dim=1, out=out)
    return out if add is None else out.add_(add)
