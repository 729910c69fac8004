"""KV store: raw KV rows and compressed entries written into the cache formats, plus the Triton
helpers every writer shares (RMSNorm, partial RoPE, Hadamard, FP8 / FP4 / bf16 encoding).

Formats (byte-exact twins in ``ref``):

* **FP8 row** (:class:`FP8RowLayout`), FlashMLA's DSV4 record of ``ref.kv_layout``: per row
  ``nope`` e4m3 bytes (each 64-channel block divided by its UE8M0 scale), ``2 * rope`` bytes of
  bf16 RoPE channels, then ``nope / 64`` scale bytes (biased exponents) and one pad byte
  (512 / 64 dims: 448 + 128 + 7 + 1 = 584 bytes). Rows are grouped in pages of
  ``rows_per_page``: a page holds every row's 576 data bytes first, then every row's 8 scale
  bytes, padded to a multiple of 576 (FlashMLA's paged cache; SGLang 0.5.17's pool). One row per
  page is the contiguous 584-byte record of ``ref.kv_layout.pack_fp8_rows``.
* **Indexer key** (:class:`IndexKeyLayout`): ``fp8`` = 128 e4m3 bytes + one fp32 scale (a power
  of 2; twin ``ref.quant.fp8_e4m3_fake_quant(k, block=128)``), ``fp4`` = 64 bytes of e2m1 pairs
  (low nibble first) + 4 UE8M0 bytes, one per 32 elements (twin ``ref.quant.fp4_e2m1_fake_quant``).
  Same paging: data of all rows of a page, then their scales.
* **Plain rows**: ``[n_rows, D]`` bf16 or fp32.

Every encoder rounds with integer arithmetic (round to nearest even), not through Triton's float
casts, so the bytes are the same on the GPU and under ``TRITON_INTERPRET=1`` (whose fp8 / bf16
casts truncate). Scales use the exact ``2^ceil(log2(amax / qmax))`` of ``ref.quant.ue8m0_scale``
computed from the exponent bits (no ``log2`` rounding).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang_dsv4.ref.kv_layout import fp8_row_bytes
from sglang_dsv4.ref.quant import (
    E2M1_GRID,
    E2M1_MAX,
    FP8_E4M3_MAX,
    fp4_e2m1_fake_quant,
    ue8m0_scale,
)

__all__ = ["FP8RowLayout", "IndexKeyLayout", "store_kv"]

_QBLOCK = 64  # channels per FP8 scale
_FP8_EXP, _FP8_MANT = 8, 0x600000  # 448 = 1.75 * 2^8
_FP4_EXP, _FP4_MANT = 2, 0x400000  # 6 = 1.5 * 2^2


@dataclass(frozen=True)
class FP8RowLayout:
    """Byte address of FP8 row ``r``: page ``r // rows_per_page``, slot ``r % rows_per_page``."""

    rows_per_page: int = 1
    page_bytes: int = 584
    head_dim: int = 512
    rope_dim: int = 64

    @classmethod
    def rows(cls, head_dim: int = 512, rope_dim: int = 64) -> "FP8RowLayout":
        """Contiguous records (the layout of ``ref.kv_layout.pack_fp8_rows``)."""
        return cls(1, fp8_row_bytes(head_dim, rope_dim), head_dim, rope_dim)

    @classmethod
    def paged(cls, rows_per_page: int, head_dim: int = 512, rope_dim: int = 64) -> "FP8RowLayout":
        """FlashMLA / SGLang pages: all rows' data, then their scales, padded to the data size."""
        data = head_dim + rope_dim
        raw = rows_per_page * fp8_row_bytes(head_dim, rope_dim)
        return cls(rows_per_page, -(-raw // data) * data, head_dim, rope_dim)

    @property
    def data_bytes(self) -> int:
        return self.head_dim + self.rope_dim  # nope e4m3 + rope bf16

    @property
    def scale_bytes(self) -> int:
        return (self.head_dim - self.rope_dim) // _QBLOCK + 1

    def empty(self, n_rows: int, device) -> torch.Tensor:
        """A zeroed cache of at least ``n_rows`` rows: uint8 [n_pages, page_bytes]."""
        pages = -(-n_rows // self.rows_per_page)
        return torch.zeros(pages, self.page_bytes, dtype=torch.uint8, device=device)

    def _offsets(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.long()
        page, slot = rows // self.rows_per_page, rows % self.rows_per_page
        data = page * self.page_bytes + slot * self.data_bytes
        scale = (
            page * self.page_bytes + self.rows_per_page * self.data_bytes + slot * self.scale_bytes
        )
        return data, scale

    def read(self, cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` [N] as contiguous records uint8 [N, fp8_row_bytes] (pure torch)."""
        flat = cache.view(torch.uint8).reshape(-1)
        data, scale = self._offsets(rows)
        d = flat[data[:, None] + torch.arange(self.data_bytes, device=flat.device)]
        s = flat[scale[:, None] + torch.arange(self.scale_bytes, device=flat.device)]
        return torch.cat([d, s], dim=1)

    def write(self, cache: torch.Tensor, rows: torch.Tensor, records: torch.Tensor) -> None:
        """Scatter contiguous records uint8 [N, fp8_row_bytes] to ``rows`` (pure torch)."""
        flat = cache.view(torch.uint8).reshape(-1)
        data, scale = self._offsets(rows)
        flat[data[:, None] + torch.arange(self.data_bytes, device=flat.device)] = records[
            :, : self.data_bytes
        ]
        flat[scale[:, None] + torch.arange(self.scale_bytes, device=flat.device)] = records[
            :, self.data_bytes :
        ]


@dataclass(frozen=True)
class IndexKeyLayout:
    """Byte address of indexer key row ``r`` (``fmt`` ``fp8`` or ``fp4``), paged like FP8 rows."""

    fmt: str = "fp8"
    rows_per_page: int = 1
    head_dim: int = 128

    def __post_init__(self):
        if self.fmt not in ("fp8", "fp4"):
            raise ValueError(f"indexer key format {self.fmt!r}: expected 'fp8' or 'fp4'")

    @property
    def data_bytes(self) -> int:
        return self.head_dim if self.fmt == "fp8" else self.head_dim // 2

    @property
    def scale_bytes(self) -> int:
        return 4 if self.fmt == "fp8" else self.head_dim // 32

    @property
    def page_bytes(self) -> int:
        return self.rows_per_page * (self.data_bytes + self.scale_bytes)

    def empty(self, n_rows: int, device) -> torch.Tensor:
        pages = -(-n_rows // self.rows_per_page)
        return torch.zeros(pages, self.page_bytes, dtype=torch.uint8, device=device)

    def _offsets(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.long()
        page, slot = rows // self.rows_per_page, rows % self.rows_per_page
        base = page * self.page_bytes
        data = base + slot * self.data_bytes
        scale = base + self.rows_per_page * self.data_bytes + slot * self.scale_bytes
        return (
            data[:, None] + torch.arange(self.data_bytes, device=device),
            scale[:, None] + torch.arange(self.scale_bytes, device=device),
        )

    def write(self, cache: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Quantize ``keys`` [N, head_dim] (fp32, already rotated) to ``rows`` (pure torch; the
        values read back are ``ref.quant``'s fake-quant of ``keys``)."""
        flat = cache.view(torch.uint8).reshape(-1)
        data, scale = self._offsets(rows, flat.device)
        if self.fmt == "fp8":
            s = ue8m0_scale(keys.abs().amax(-1, keepdim=True), FP8_E4M3_MAX)  # [N, 1]
            flat[data] = (keys / s).to(torch.float8_e4m3fn).view(torch.uint8)
            flat[scale] = s.float().contiguous().view(torch.uint8)
            return
        blocks = keys.float().unflatten(-1, (-1, 32))
        s = ue8m0_scale(blocks.abs().amax(-1, keepdim=True), E2M1_MAX)  # [N, G, 1]
        mag = (fp4_e2m1_fake_quant(keys).unflatten(-1, (-1, 32)) / s).abs().flatten(1)
        code = (mag.unsqueeze(-1) == E2M1_GRID.to(mag.device)).int().argmax(-1)  # exact grid values
        nib = (code + torch.where(keys < 0, 8, 0)).to(torch.uint8).unflatten(-1, (-1, 2))
        flat[data] = nib[..., 0] | (nib[..., 1] << 4)
        flat[scale] = (torch.log2(s.squeeze(-1)) + 127).to(torch.uint8)

    def read(self, cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Dequantized keys fp32 [N, head_dim] of ``rows`` [N] (pure torch)."""
        flat = cache.view(torch.uint8).reshape(-1)
        data, scale = self._offsets(rows, flat.device)
        d, s = flat[data], flat[scale]
        if self.fmt == "fp8":
            return d.view(torch.float8_e4m3fn).float() * s.contiguous().view(torch.float32)
        nib = torch.stack([d & 15, d >> 4], dim=-1).flatten(1).long()  # [N, Dh] low nibble first
        mag = E2M1_GRID.to(flat.device)[nib & 7]
        val = torch.where(nib >= 8, -mag, mag).unflatten(1, (-1, 32))
        return (val * torch.exp2(s.float() - 127).unsqueeze(-1)).flatten(1)


# ---------------------------------------------------------------- shared Triton helpers


@triton.jit
def ue8m0_exponent(amax, QMAX_EXP: tl.constexpr, QMAX_MANT: tl.constexpr):
    """``ceil(log2(max(amax, 2^-126) / qmax))`` exactly, for qmax = (1 + QMAX_MANT/2^23) 2^QMAX_EXP:
    with amax = m 2^ea (1 <= m < 2) the ratio m / qmax_m lies in (1/2, 2)."""
    bits = tl.maximum(amax, 1.1754943508222875e-38).to(tl.int32, bitcast=True)
    ea = ((bits >> 23) & 0xFF) - 127
    return ea - QMAX_EXP + ((bits & 0x7FFFFF) > QMAX_MANT).to(tl.int32)


@triton.jit
def pow2(e):
    """fp32 ``2^e`` (``e`` clamped to the normal range)."""
    e = tl.minimum(tl.maximum(e, -126), 127)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_codes(v):
    """e4m3fn byte (int32) of fp32 ``v`` with |v| <= 448, round to nearest even."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    r = bits + 0x7FFFF + ((bits >> 20) & 1)  # round the mantissa to 3 bits (carry into exponent)
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # multiples of 2^-9, RNE by fp add
    code = tl.where(a >= 0.015625, normal, sub)
    return code | ((v.to(tl.int32, bitcast=True) >> 24) & 0x80)  # the sign bit, also of -0.0


@triton.jit
def bf16_codes(v):
    """bf16 bits (int32, low 16 bits) of fp32 ``v``, round to nearest even."""
    b = v.to(tl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def round_bf16(v):
    """fp32 ``v`` rounded to the nearest bf16 (as fp32)."""
    return (bf16_codes(v) << 16).to(tl.float32, bitcast=True)


@triton.jit
def rms_inv(x, eps, D: tl.constexpr):
    """1 / RMS of each row of ``x`` [TB, D] (correctly rounded sqrt and division, like torch)."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps))


@triton.jit
def norm_apply(v, inv, w, X_BF16: tl.constexpr, W_BF16: tl.constexpr):
    """``w * (v * inv)`` with the dtype flow of ``ref.norm.rms_norm`` for bf16 inputs (normed
    value rounded to bf16, bf16 x bf16 weight product rounded); ``v`` [TB, K], ``w`` [K]."""
    y = v * inv[:, None]
    if X_BF16:
        y = round_bf16(y)
    y = w.to(tl.float32)[None, :] * y
    if X_BF16 and W_BF16:
        y = round_bf16(y)
    return y


@triton.jit
def rms_norm_rows(x, w_ptr, eps, D: tl.constexpr, X_BF16: tl.constexpr, W_BF16: tl.constexpr):
    """``ref.norm.rms_norm`` of ``x`` [TB, D] with weight."""
    w = tl.load(w_ptr + tl.arange(0, D))
    return norm_apply(x, rms_inv(x, eps, D), w, X_BF16, W_BF16)


@triton.jit
def rope_pairs(re, im, pos, inv_freq_ptr, ROUND: tl.constexpr):
    """Interleaved RoPE (``ref.rope.apply_rope``) of pairs ``(re, im)`` [TB, 32] at integer
    positions ``pos`` [TB]."""
    ang = pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + tl.arange(0, 32))[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
    re2 = re * c - im * s
    im2 = re * s + im * c
    if ROUND:
        re2 = round_bf16(re2)
        im2 = round_bf16(im2)
    return re2, im2


@triton.jit
def rope_rows(x, pos, inv_freq_ptr, TB: tl.constexpr, D: tl.constexpr, ROUND: tl.constexpr):
    """RoPE of the last 64 channels of ``x`` [TB, D] held in registers."""
    NB: tl.constexpr = D // 64
    xb = tl.reshape(x, [TB, NB, 64])
    last = (tl.arange(0, NB) == NB - 1)[None, :, None]
    r = tl.sum(tl.where(last, xb, 0.0), axis=1)  # [TB, 64]
    re, im = tl.split(tl.reshape(r, [TB, 32, 2]))
    re, im = rope_pairs(re, im, pos, inv_freq_ptr, ROUND)
    rot = tl.reshape(tl.join(re, im), [TB, 64])
    return tl.reshape(tl.where(last, rot[:, None, :], xb), [TB, D])


@triton.jit
def hadamard_rows(x, TB: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """Sylvester Walsh-Hadamard of each row of ``x`` [TB, D], scaled by D^-1/2 (the butterfly
    order of ``ref.quant.hadamard``, so the fp32 result is identical)."""
    for k in tl.static_range(LOG2D):  # butterflies of span 2^k (shapes must stay constexpr)
        y = tl.permute(tl.reshape(x, [TB, D >> (k + 1), 2, 1 << k]), (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, [TB, D])
    return x * (D**-0.5)


@triton.jit
def store_fp8_rows(
    cache_ptr,
    rows,
    ok,
    x,
    TB: tl.constexpr,
    D: tl.constexpr,
    RPP: tl.constexpr,
    PAGE: tl.constexpr,
    ROPE_FROM_X: tl.constexpr = True,
):
    """Encode ``x`` [TB, D] (fp32) as FP8 rows at ``rows`` [TB] (int64) where ``ok``; with
    ``ROPE_FROM_X=False`` only the nope bytes and scales (see ``store_rope_pairs``)."""
    NB: tl.constexpr = D // 64
    NOPE: tl.constexpr = D - 64
    DATA: tl.constexpr = D + 64
    page = rows // RPP
    slot = rows - page * RPP
    base = page * PAGE + slot * DATA
    sbase = page * PAGE + RPP * DATA + slot * NB
    xb = tl.reshape(x, [TB, NB, 64])
    e = ue8m0_exponent(tl.max(tl.abs(xb), axis=2), 8, 0x600000)  # [TB, NB]
    codes = e4m3_codes(xb * pow2(-e)[:, :, None])
    blk = tl.arange(0, NB)[None, :, None]
    ch = tl.arange(0, 64)[None, None, :]
    okb = ok[:, None, None]
    tl.store(
        cache_ptr + base[:, None, None] + blk * 64 + ch, codes.to(tl.uint8), okb & (blk < NB - 1)
    )
    if ROPE_FROM_X:
        rope_ptr = (cache_ptr + base[:, None, None] + NOPE + 2 * ch + 0 * blk).to(
            tl.pointer_type(tl.int16)
        )
        tl.store(rope_ptr, bf16_codes(xb).to(tl.int16), okb & (blk == NB - 1))
    b2 = tl.arange(0, NB)[None, :]
    scales = tl.where(b2 < NB - 1, (e + 127) & 0xFF, 0)  # the last byte is padding
    tl.store(cache_ptr + sbase[:, None] + b2, scales.to(tl.uint8), ok[:, None])


@triton.jit
def store_rope_pairs(
    cache_ptr, rows, ok, re, im, D: tl.constexpr, RPP: tl.constexpr, PAGE: tl.constexpr
):
    """The bf16 RoPE channels of FP8 rows from pairs ``(re, im)`` [TB, 32]."""
    page = rows // RPP
    base = page * PAGE + (rows - page * RPP) * (D + 64) + (D - 64)
    off = base[:, None] + 4 * tl.arange(0, 32)[None, :]
    tl.store(
        (cache_ptr + off).to(tl.pointer_type(tl.int16)), bf16_codes(re).to(tl.int16), ok[:, None]
    )
    tl.store(
        (cache_ptr + off + 2).to(tl.pointer_type(tl.int16)),
        bf16_codes(im).to(tl.int16),
        ok[:, None],
    )


@triton.jit
def store_plain_rows(out_ptr, rows, ok, x, D: tl.constexpr, BF16: tl.constexpr, UPTO: tl.constexpr):
    """Channels ``< UPTO`` of ``x`` [TB, D] into plain rows of ``out_ptr`` (bf16 rounded to
    nearest even, or fp32)."""
    cols = tl.arange(0, D)[None, :]
    off = rows[:, None] * D + cols
    m = ok[:, None] & (cols < UPTO)
    if BF16:
        ptr = (out_ptr + off).to(tl.pointer_type(tl.int16))  # out_ptr is a bf16 pointer
        tl.store(ptr, bf16_codes(x).to(tl.int16), m)
    else:
        tl.store(out_ptr + off, x, m)


@triton.jit
def store_index_keys(
    cache_ptr, rows, ok, x, TB: tl.constexpr, D: tl.constexpr, FP4: tl.constexpr, RPP: tl.constexpr
):
    """Encode indexer keys ``x`` [TB, D] (already rotated) at ``rows`` [TB] where ``ok``."""
    DATA: tl.constexpr = D // 2 if FP4 else D
    SCALE: tl.constexpr = D // 32 if FP4 else 4
    page = rows // RPP
    slot = rows - page * RPP
    base = page * (RPP * (DATA + SCALE)) + slot * DATA
    sbase = page * (RPP * (DATA + SCALE)) + RPP * DATA + slot * SCALE
    if FP4:
        NG: tl.constexpr = D // 32
        xb = tl.reshape(x, [TB, NG, 32])
        e = ue8m0_exponent(tl.max(tl.abs(xb), axis=2), 2, 0x400000)  # [TB, NG]
        v = tl.minimum(tl.abs(xb) * pow2(-e)[:, :, None], 6.0)
        # nearest e2m1 magnitude code, ties to the even code (the grid's midpoints)
        code = (
            (v > 0.25).to(tl.int32)
            + (v >= 0.75).to(tl.int32)
            + (v > 1.25).to(tl.int32)
            + (v >= 1.75).to(tl.int32)
            + (v > 2.5).to(tl.int32)
            + (v >= 3.5).to(tl.int32)
            + (v > 5.0).to(tl.int32)
        )
        nib = tl.reshape(code | tl.where(xb < 0, 8, 0), [TB, D // 2, 2])
        lo, hi = tl.split(nib)
        off = base[:, None] + tl.arange(0, D // 2)[None, :]
        tl.store(cache_ptr + off, (lo | (hi << 4)).to(tl.uint8), ok[:, None])
        soff = sbase[:, None] + tl.arange(0, NG)[None, :]
        tl.store(cache_ptr + soff, ((e + 127) & 0xFF).to(tl.uint8), ok[:, None])
    else:
        e = ue8m0_exponent(tl.max(tl.abs(x), axis=1), 8, 0x600000)  # [TB]
        codes = e4m3_codes(x * pow2(-e)[:, None])
        off = base[:, None] + tl.arange(0, D)[None, :]
        tl.store(cache_ptr + off, codes.to(tl.uint8), ok[:, None])
        tl.store((cache_ptr + sbase).to(tl.pointer_type(tl.float32)), pow2(e), ok)


# ---------------------------------------------------------------- raw KV store


@triton.jit(do_not_specialize=["n_tokens"])
def _kv_store_kernel(
    kv_ptr,
    kv_stride,
    w_ptr,
    pos_ptr,
    inv_freq_ptr,
    rows_ptr,
    cache_ptr,
    n_tokens,
    eps,
    D: tl.constexpr,
    TB: tl.constexpr,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    X_BF16: tl.constexpr,
    W_BF16: tl.constexpr,
    FMT: tl.constexpr,  # 0 FP8 rows, 1 bf16 rows, 2 fp32 rows
    RPP: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0) * TB + tl.arange(0, TB)
    inb = t < n_tokens
    rows = tl.load(rows_ptr + t, mask=inb, other=-1).to(tl.int64)
    ok = inb & (rows >= 0)
    cols = tl.arange(0, D)
    src = kv_ptr + t.to(tl.int64) * kv_stride
    x = tl.load(src[:, None] + cols[None, :], ok[:, None], 0.0).to(tl.float32)  # [TB, D]
    # the RoPE pairs again, de-interleaved (cache hits): no register shuffles for the rotation
    pair = D - 64 + 2 * tl.arange(0, 32)
    re = tl.load(src[:, None] + pair[None, :], ok[:, None], 0.0).to(tl.float32)  # [TB, 32]
    im = tl.load(src[:, None] + pair[None, :] + 1, ok[:, None], 0.0).to(tl.float32)
    if NORM:
        inv = rms_inv(x, eps, D)
        x = norm_apply(x, inv, tl.load(w_ptr + cols), X_BF16, W_BF16)
        re = norm_apply(re, inv, tl.load(w_ptr + pair), X_BF16, W_BF16)
        im = norm_apply(im, inv, tl.load(w_ptr + pair + 1), X_BF16, W_BF16)
    if ROPE:
        pos = tl.load(pos_ptr + t, mask=ok, other=0)
        re, im = rope_pairs(re, im, pos, inv_freq_ptr, X_BF16 and W_BF16)
    if FMT == 0:
        store_fp8_rows(cache_ptr, rows, ok, x, TB, D, RPP, PAGE, False)
        store_rope_pairs(cache_ptr, rows, ok, re, im, D, RPP, PAGE)
    else:
        store_plain_rows(cache_ptr, rows, ok, x, D, FMT == 1, D - 64)
        off = rows[:, None] * D + pair[None, :]
        if FMT == 1:
            ptr = (cache_ptr + off).to(tl.pointer_type(tl.int16))
            tl.store(ptr, bf16_codes(re).to(tl.int16), ok[:, None])
            tl.store(ptr + 1, bf16_codes(im).to(tl.int16), ok[:, None])
        else:
            tl.store(cache_ptr + off, re, ok[:, None])
            tl.store(cache_ptr + off + 1, im, ok[:, None])


def store_kv(
    kv: torch.Tensor,
    cache: torch.Tensor,
    rows: torch.Tensor,
    *,
    layout: FP8RowLayout | None = None,
    norm_weight: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """Write KV rows ``kv`` [N, D] (fp32 or bf16, e.g. ``wkv(x)``) to ``rows`` [N] (int32/int64,
    negative = skip) of ``cache``, optionally after ``RMSNorm_w`` and RoPE at ``positions`` [N]
    with ``inv_freq`` [32] (the raw KV of ``ref.model.RefDSV4.project``).

    ``cache`` is FP8 (uint8, addressed by ``layout``; default contiguous 584-byte rows) or plain
    bf16 / fp32 rows [n_rows, D] (``layout`` ignored). Launch only: no sync, no allocation.
    """
    n, d = kv.shape
    if d % 64 or d & (d - 1):
        raise ValueError(f"head dim {d}: a power of 2 with 64 RoPE channels is required")
    if cache.dtype == torch.uint8:
        layout = layout or FP8RowLayout.rows(d)
        if layout.head_dim != d or layout.rope_dim != 64:
            raise ValueError(f"layout {layout} does not hold rows of {d} channels")
        fmt, rpp, page = 0, layout.rows_per_page, layout.page_bytes
    elif cache.dtype in (torch.bfloat16, torch.float32):
        fmt, rpp, page = (1 if cache.dtype == torch.bfloat16 else 2), 1, 1
    else:
        raise TypeError(f"cache dtype {cache.dtype}: uint8 (FP8 rows), bfloat16 or float32")
    if kv.stride(1) != 1:
        raise ValueError("kv rows must be contiguous in the channel dim")
    norm = norm_weight is not None
    rope = positions is not None
    if rope and inv_freq is None:
        raise ValueError("RoPE needs inv_freq")
    if n == 0:
        return
    tb = 16
    dummy = kv
    _kv_store_kernel[(triton.cdiv(n, tb),)](
        kv,
        kv.stride(0),
        norm_weight if norm else dummy,
        positions if rope else rows,
        inv_freq if rope else dummy,
        rows,
        cache,
        n,
        eps,
        D=d,
        TB=tb,
        NORM=norm,
        ROPE=rope,
        X_BF16=kv.dtype == torch.bfloat16,
        W_BF16=norm and norm_weight.dtype == torch.bfloat16,
        FMT=fmt,
        RPP=rpp,
        PAGE=page,
        num_warps=4,
        enable_fp_fusion=False,
    )
