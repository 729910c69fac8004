"""FP8 block-scaled linear, W8A16: ``y = x @ (q * scale).T`` without materializing the weight.

``x`` [M, K] (bf16 / fp16 / fp32), ``q`` float8_e4m3fn [N, K], ``scale`` float8_e8m0fnu
[ceil(N/128), ceil(K/128)] (the released layout, :mod:`sglang_dsv4.ref.weight_quant`).
Each program owns a [BLOCK_M, BLOCK_N] output tile and walks K in 128-wide steps, one scale
column per step: ``acc += dot(x_tile, q_tile.T) * scale[n // 128, k // 128]`` (e4m3 -> the
activation dtype is exact, the scale is applied to the fp32 partial sums). Activations stay in
their dtype (no per-token FP8 activation quantization): the result equals the dequantize-then-
matmul reference up to accumulation order.
Twin: :func:`sglang_dsv4.ref.weight_quant.fp8_block_linear`.
"""

import torch
import triton
import triton.language as tl

__all__ = ["fp8_block_linear"]

_SCALE_BLOCK = 128


@triton.jit
def _fp8_block_linear_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        # e8m0 byte b means 2^(b - 127)
        sb = tl.load(s_ptr + (offs_n // 128) * stride_sn + k0 // 128, mask=n_ok, other=127)
        scale = tl.exp2(sb.to(tl.float32) - 127.0)  # [BLOCK_N]
        if IEEE:
            part = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w.to(x.dtype)))
        acc += part * scale[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def _tile(m: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps): N tiles narrow (down to 32) until the grid fills the GPU
    (decode has a single row of tiles); under the interpreter a small target exercises the
    widths. Measured on H100: 16-wide tiles and 128-row M tiles (8 warps) were slower."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    block_n = 128
    while block_n > 32 and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < target:
        block_n //= 2
    return block_m, block_n, 4


def fp8_block_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] @ dequant(``q`` [N, K], ``scale``).T -> [..., N] in ``x``'s dtype;
    ``scale`` the e8m0 tiles or their bytes (uint8)."""
    n, k = q.shape
    if tuple(scale.shape) != (-(-n // _SCALE_BLOCK), -(-k // _SCALE_BLOCK)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not tile [{n}, {k}] by 128")
    lead = x.shape[:-1]
    flat = x.dim() == 2  # the model's rows: no reshape / view ops around the launch
    x2 = (x if flat else x.reshape(-1, k)).contiguous()
    q, scale = q.contiguous(), scale.contiguous()
    # e8m0 tiles are read as bytes (Triton has no e8m0 pointer); FP8Linear hands its byte view,
    # made once, a dtype view here dispatches two torch ops per call
    scale = scale if scale.dtype == torch.uint8 else scale.view(torch.uint8)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y if flat else y.view(*lead, n)
    block_m, block_n, warps = _tile(m, n, x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_linear_kernel[grid](
        x2,
        q,
        scale,
        y,
        m,
        n,
        k,
        x2.stride(0),
        q.stride(0),
        scale.stride(0),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=128,  # one scale column per K step (the tile follows the scale blocks)
        IEEE=x.dtype == torch.float32,
        num_warps=warps,
        num_stages=3,
    )
    return y if flat else y.view(*lead, n)
