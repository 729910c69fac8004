"""Sparse MQA decode through our CuTe DSL sm90 kernel (``kernels.cute_mqa_kernel``), with the plan /
run interface and the math of ``kernels.attention.SparseMQA`` (twin:
``ref.attention.sparse_attention``): FP8 584-byte rows in FlashMLA's paged layout, a main and an
optional extra list per query row, 64 or 128 heads of 512 channels, per-head sink, LSE out,
split-K with the combine fused into the kernel.

Requires ``nvidia-cutlass-dsl`` (4.8; ``scripts/install_cutlass_dsl.sh`` on the GPU machine) and
an sm90 GPU to run. Compiling needs no GPU: the DSL emits an sm_90a cubin on the host
(``compile_kernel``; tests/kernels/test_cute_sparse_mqa.py compiles every configuration on CPU).

Compile cache: one compiled kernel per static configuration ``KernelKey`` (heads, which optional
inputs exist, split or not, LSE or not), compiled on first use in the process; every runtime
shape (rows, splits, list widths, strides, page geometry) is a kernel argument.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from sglang_dsv4.kernels.attention import plan_splits

__all__ = ["CuteSparseMQA", "KernelKey", "compile_kernel", "cute_available", "cute_eligible"]

BLOCK_N = 64
HEADS_PER_CTA = 64


@functools.cache
def cute_available() -> bool:
    """nvidia-cutlass-dsl importable (the GPU machine gets it from install_cutlass_dsl.sh). The
    DSL reads its target once, at import: sm_90a unless ``CUTE_DSL_ARCH`` says otherwise (its
    own default is sm_100a when no GPU is found, e.g. compiling on a CPU machine)."""
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    try:
        import cutlass.cute  # noqa: F401
    except Exception:
        return False
    return True


def cute_eligible(fp8_rows: bool, heads: int, head_dim: int, device) -> bool:
    """Where the kernel runs: FP8 rows, 64 / 128 heads of 512 channels, sm90, cutlass present."""
    dev = torch.device(device)
    if not (fp8_rows and heads in (64, 128) and head_dim == 512 and dev.type == "cuda"):
        return False
    return torch.cuda.get_device_capability(dev)[0] == 9 and cute_available()


class KernelKey(NamedTuple):
    heads: int
    has_extra: bool
    has_len: bool
    has_xlen: bool
    split: bool
    write_lse: bool


def _fake_args(key: KernelKey):
    """Placeholder arguments of the right types for compiling without data (or a GPU)."""
    import cuda.bindings.driver as cuda
    import cutlass
    from cutlass.cute.runtime import make_ptr

    from sglang_dsv4.kernels.cute_mqa_kernel import Geometry

    def ptr(dtype, align=16):
        return make_ptr(dtype, 0, cutlass.cute.AddressSpace.gmem, assumed_align=align)

    u8, i32, f32, bf16 = cutlass.Uint8, cutlass.Int32, cutlass.Float32, cutlass.BFloat16
    geo = Geometry(*[i32(1)] * len(Geometry._fields))
    return (
        ptr(bf16), ptr(u8), ptr(i32, 4), ptr(i32, 4), ptr(u8), ptr(i32, 4), ptr(i32, 4),
        ptr(f32, 4), ptr(bf16), ptr(f32, 4), ptr(f32), ptr(f32, 4), ptr(i32, 4), geo,
        f32(1.0), i32(1), i32(1), cuda.CUstream(0),
    )  # fmt: skip


@functools.cache
def compile_kernel(key: KernelKey):
    """The compiled kernel of one static configuration (cached per process). Compiles for
    ``CUTE_DSL_ARCH`` (default sm_90a): no GPU needed."""
    if not cute_available():
        raise RuntimeError("nvidia-cutlass-dsl is not importable (scripts/install_cutlass_dsl.sh)")
    import cutlass.cute as cute

    from sglang_dsv4.kernels.cute_mqa_kernel import SparseMQAKernel

    kernel = SparseMQAKernel(*key)
    return cute.compile(kernel, *_fake_args(key))


def _cache_geometry(cache: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """uint8 view of an FP8 cache -> (it, rows per page, bytes between pages). 2-D = one row per
    page. The kernel loads 16 bytes at a time: pages must start 16-byte aligned."""
    cache = cache.view(torch.uint8)
    page, stride = (1, cache.stride(0)) if cache.dim() == 2 else (cache.shape[1], cache.stride(0))
    if stride % 16 or cache.data_ptr() % 16:
        raise ValueError(
            f"CuTe sparse MQA needs 16-byte aligned pages (page stride {stride} bytes); "
            "use FlashMLA's paged layout (kernels.attention.fp8_rows_to_pages)"
        )
    return cache, page, stride


def _flat(indices: torch.Tensor) -> torch.Tensor:
    return indices.flatten(0, -2) if indices.dim() == 3 else indices


class CuteSparseMQA:
    """Plan / run wrapper of the CuTe kernel, interchangeable with ``kernels.attention.SparseMQA``
    (same ``plan`` / ``run`` signatures, same outputs). ``run`` only launches (CUDA-graph
    capturable: the split counters are reset by the kernel itself)."""

    def __init__(self, num_heads: int, head_dim: int = 512, *, kv_fp8: bool = True,
                 device: torch.device | str = "cuda", num_sms: int | None = None):  # fmt: skip
        if not kv_fp8 or head_dim != 512 or num_heads not in (64, 128):
            raise ValueError(
                f"CuTe sparse MQA serves FP8 rows, 64 / 128 heads of 512 (got fp8={kv_fp8}, "
                f"heads={num_heads}, head_dim={head_dim})"
            )
        self.num_heads, self.head_dim, self.kv_fp8 = num_heads, head_dim, kv_fp8
        self.device = torch.device(device)
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.num_sms = num_sms

    def plan(self, num_tokens: int, topk: int, extra_topk: int = 0, *,
             num_splits: int | None = None, return_lse: bool = False) -> None:  # fmt: skip
        """Host work for ``num_tokens`` query rows with lists of ``topk`` (main) and
        ``extra_topk`` (extra, 0 = none) slots; splits the lists until the grid fills the SMs
        once (``num_splits`` overrides)."""
        self.num_tokens, self.topk, self.extra_topk = num_tokens, topk, extra_topk
        head_blocks = self.num_heads // HEADS_PER_CTA
        self.chunk, self.num_splits = plan_splits(
            topk + extra_topk, BLOCK_N, num_tokens * head_blocks, self.num_sms, num_splits
        )
        dev, h, d = self.device, self.num_heads, self.head_dim
        self.out = torch.empty(num_tokens, h, d, dtype=torch.bfloat16, device=dev)
        self.lse = torch.empty(num_tokens, h, device=dev) if return_lse else None
        n = max(1, num_tokens)
        if self.num_splits > 1:
            self.part_o = torch.empty(n, self.num_splits, h, d, device=dev)
            self.part_lse = torch.empty(n, self.num_splits, h, device=dev)
        else:
            self.part_o = self.part_lse = torch.empty(1, device=dev)
        self.counters = torch.zeros(n * head_blocks, dtype=torch.int32, device=dev)

    def run(self, q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor,
            scale: float, *, extra_kv: torch.Tensor | None = None,
            extra_indices: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
            extra_lengths: torch.Tensor | None = None, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """As ``SparseMQA.run``: ``q`` [T, H, 512] bf16, caches FP8 paged, ``indices`` [T, topk]
        int32 (-1 = none), optional extra cache / indices / valid lengths, ``sink`` [H] fp32.
        Writes and returns ``out`` [T, H, 512] bf16; the natural-log LSE to ``lse``."""
        import cuda.bindings.driver as cuda

        out = self.out if out is None else out
        key, args = self.launch_args(
            q, kv, indices, sink, scale, extra_kv=extra_kv, extra_indices=extra_indices,
            lengths=lengths, extra_lengths=extra_lengths, out=out,
            lse=self.lse if lse is None else lse,
        )  # fmt: skip
        stream = cuda.CUstream(torch.cuda.current_stream(q.device).cuda_stream)
        compile_kernel(key)(*args, stream)
        return out

    def launch_args(self, q, kv, indices, sink, scale, *, extra_kv, extra_indices, lengths,
                    extra_lengths, out, lse) -> tuple[KernelKey, tuple]:  # fmt: skip
        """The kernel's configuration and arguments (all but the stream) for ``run``'s inputs.
        Every runtime value is a DSL ``Int32`` / ``Float32``: a plain Python number would be
        traced as a compile-time constant and silently ignored by the compiled kernel."""
        import cutlass
        from cutlass.cute.runtime import make_ptr

        from sglang_dsv4.kernels.cute_mqa_kernel import Geometry

        _check_rows(q, "q")
        _check_rows(out, "out")
        indices = _flat(indices)
        kv, page, pstride = _cache_geometry(kv)
        has_extra = extra_kv is not None
        if has_extra:
            extra_indices = _flat(extra_indices)
            xkv, xpage, xpstride = _cache_geometry(extra_kv)
        else:
            xkv, extra_indices, xpage, xpstride = kv, indices, page, pstride
        sink = sink.float()  # a no-op for fp32 sinks (the kernel reads fp32)
        key = KernelKey(
            self.num_heads, has_extra, lengths is not None,
            has_extra and extra_lengths is not None, self.num_splits > 1, lse is not None,
        )  # fmt: skip
        gmem = cutlass.cute.AddressSpace.gmem

        def ptr(t, dtype, align=16):
            return make_ptr(dtype, t.data_ptr(), gmem, assumed_align=align)

        u8, i32, f32, bf16 = cutlass.Uint8, cutlass.Int32, cutlass.Float32, cutlass.BFloat16
        geo = Geometry(
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), indices.stride(0),
            extra_indices.stride(0), page, pstride, xpage, xpstride, self.topk,
            self.extra_topk if has_extra else 0, self.chunk,
        )  # fmt: skip
        args = (
            ptr(q, bf16), ptr(kv, u8), ptr(indices, i32, 4),
            ptr(lengths if lengths is not None else indices, i32, 4), ptr(xkv, u8),
            ptr(extra_indices, i32, 4),
            ptr(extra_lengths if extra_lengths is not None else indices, i32, 4),
            ptr(sink, f32, 4), ptr(out, bf16), ptr(lse if lse is not None else sink, f32, 4),
            ptr(self.part_o, f32), ptr(self.part_lse, f32, 4), ptr(self.counters, i32, 4),
            Geometry(*[i32(v) for v in geo]), f32(scale * 1.4426950408889634),
            i32(self.num_tokens), i32(self.num_splits),
        )  # fmt: skip
        return key, args


def _check_rows(x: torch.Tensor, name: str) -> None:
    """[T, H, 512] bf16 rows read / written 16 bytes at a time."""
    if x.dtype != torch.bfloat16 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be bf16 with contiguous channels, got {x.dtype}")
    if x.stride(0) % 8 or x.stride(1) % 8 or x.data_ptr() % 16:
        raise ValueError(f"{name} rows must be 16-byte aligned (strides {x.stride()})")
