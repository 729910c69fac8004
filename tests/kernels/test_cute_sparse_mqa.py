"""``kernels.cute_sparse_mqa.CuteSparseMQA`` (CuTe DSL, sm90) against the FP8-simulating reference
(``ref.attention.sparse_attention`` over the unpacked bytes the kernel reads; tolerance as the
Triton kernel's GPU tests: 1e-2 relative L2).

CPU (needs nvidia-cutlass-dsl importable, no GPU): every kernel configuration the wrapper can
ask for compiles to an sm_90a cubin whose SASS has the two wgmma shapes and no local memory, and
the plan's split arithmetic. GPU (``@pytest.mark.gpu``; skipped without CUDA or cutlass): fresh
random inputs into NaN-poisoned outputs, Flash (64 heads) and Pro (128 heads) shapes, batches 1,
3 and 129, HCA lists up to a 1M-token context, forced splits (the fused combine), LSE, and a
CUDA graph replay equal to eager.
"""

import glob
import os
import struct
import subprocess

import pytest
import torch
from sparse_mqa_cases import (
    CSA_CASES,
    dsv4_case,
    graph_replay_matches_eager,
    reference,
    rel_l2,
    run_checked,
)

from sglang_dsv4.kernels import cute_sparse_mqa as C

needs_cute = pytest.mark.skipif(not C.cute_available(), reason="nvidia-cutlass-dsl not importable")
TOL = 1e-2


def _cubin(obj: bytes) -> bytes:
    """The CUDA ELF (e_machine 190) embedded in the compiled kernel's host object."""
    at = obj.find(b"\x7fELF", 1)
    while at >= 0 and struct.unpack_from("<H", obj, at + 18)[0] != 190:
        at = obj.find(b"\x7fELF", at + 1)
    assert at > 0, "no cubin in the compiled object"
    return obj[at:]


def _cuda_tool(name: str) -> str | None:
    """nvdisasm / cuobjdump as triton ships them."""
    import triton

    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", name))
    return found[0] if found else None


# --- CPU: compile for sm_90a without a GPU ---------------------------------------------------


@needs_cute
@pytest.mark.parametrize(
    "key",
    [
        C.KernelKey(64, True, False, True, False, True),  # Flash CSA / HCA, one split, LSE
        C.KernelKey(128, True, True, True, True, True),  # Pro, split-K with the fused combine
    ],
    ids=["flash-1split", "pro-split"],
)
def test_compiles_to_sm90a_wgmma(key, tmp_path):
    cubin = _cubin(C.compile_kernel(key).dump_to_object("k"))
    flags = struct.unpack_from("<I", cubin, 48)[0]
    assert (flags >> 8) & 0xFF == 90, hex(flags)  # sm_90(a)
    tool, objdump = _cuda_tool("nvdisasm"), _cuda_tool("cuobjdump")
    if tool is None or objdump is None:
        pytest.skip("no nvdisasm / cuobjdump to read the cubin")
    (tmp_path / "k.cubin").write_bytes(cubin)
    res = subprocess.run([objdump, "-res-usage", str(tmp_path / "k.cubin")], capture_output=True,
                         text=True).stdout  # fmt: skip
    regs = int(res.split("REG:")[1].split()[0])
    from sglang_dsv4.kernels import cute_mqa_kernel as K  # cutlass: imported after its arch is set

    # setmaxnreg only moves registers inside the launch allocation: more would hang the consumers
    assert K.THREADS * regs >= 128 * K.PRODUCER_REGS + 256 * K.CONSUMER_REGS, regs
    sass = subprocess.run([tool, str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert sass.returncode == 0, sass.stderr
    assert "HGMMA.64x64x16.F32.BF16" in sass.stdout  # S = Q K^T
    assert "HGMMA.64x256x16.F32.BF16" in sass.stdout  # O += P V
    assert "LDG.E.128" in sass.stdout and "STS.128" in sass.stdout  # 16-byte gather / tile
    # register spills: none with cutlass-dsl 4.8.1 (the GPU machine's); 4.6.0 (this venv's, via
    # sglang) parked 3 values on a 16-byte stack (3 STL + 3 LDL) with 64 / 224 registers
    local = sum(line.split()[1].startswith(("STL", "LDL")) for line in sass.stdout.splitlines()
                if len(line.split()) > 1)  # fmt: skip
    assert local <= 6, f"{local} local-memory instructions"


def test_plan_splits_cover_the_lists():
    attn = C.CuteSparseMQA(64, device="cpu", num_sms=132)
    attn.plan(1, 128, 512)  # batch 1 CSA Flash: 10 blocks of 64
    assert attn.num_splits > 1 and attn.chunk % C.BLOCK_N == 0
    assert (attn.num_splits - 1) * attn.chunk < 640 <= attn.num_splits * attn.chunk
    assert attn.counters.shape == (1,) and not attn.counters.any()
    attn.plan(129, 128, 512)  # the grid is full without splitting
    assert attn.num_splits == 1
    attn = C.CuteSparseMQA(128, device="cpu", num_sms=132)
    attn.plan(3, 128, 0, num_splits=2)
    assert attn.num_splits == 2 and attn.counters.shape == (6,)  # 3 rows x 2 head blocks


def test_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="FP8 rows, 64 / 128 heads"):
        C.CuteSparseMQA(16, device="cpu", num_sms=132)
    with pytest.raises(ValueError, match="16-byte aligned pages"):
        C._cache_geometry(torch.zeros(4, 584, dtype=torch.uint8))  # 584-byte rows, unpaged
    assert not C.cute_eligible(True, 64, 512, "cpu")


# --- GPU ---------------------------------------------------------------------------------------


def _check(h, t, context, topk, *, lengths=False, num_splits=None):
    """One DSV4 decode case (SWA window + c4 top-k or c128 entries) against the reference."""
    q, (swa, swa_rows, idx), (xc, xrows, xidx, xlen), sink = dsv4_case(t, h, context, topk, lengths)
    attn = C.CuteSparseMQA(h, 512)
    attn.plan(t, 128, xidx.shape[1], num_splits=num_splits, return_lse=True)
    attn.lse.fill_(float("nan"))
    kw = dict(extra_kv=xc, extra_indices=xidx, extra_lengths=xlen)
    out = run_checked(attn, q, swa, idx, sink, 512**-0.5, **kw)
    ref = reference(q, swa_rows, idx, sink, 512**-0.5, xrows, xidx, None, xlen)
    err = rel_l2(out, ref)
    assert err < TOL, err
    # LSE against our Triton kernel's (tested against the reference in test_attention)
    from sglang_dsv4.kernels.attention import SparseMQA

    twin = SparseMQA(h, 512)
    twin.plan(t, 128, xidx.shape[1], return_lse=True)
    twin.run(q, swa, idx, sink, 512**-0.5, **kw)
    assert torch.allclose(attn.lse, twin.lse, atol=2e-2, rtol=0), (attn.lse - twin.lse).abs().max()
    assert not attn.counters.any(), "split counters not reset"
    return attn


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize(("h", "topk", "t", "context"), CSA_CASES)
def test_gpu_csa_decode(h, topk, t, context):
    _check(h, t, context, topk)


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize(
    ("h", "t", "context", "lengths"),
    [
        (64, 1, 1 << 20, False),
        (64, 3, 131072, True),
        (64, 129, 4097, True),
        (128, 129, 4097, False),
        (128, 1, 1 << 20, True),
        (128, 3, 65536, False),
    ],
)
def test_gpu_hca_decode(h, t, context, lengths):
    _check(h, t, context, None, lengths=lengths)


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize(("h", "t", "splits"), [(64, 3, 1), (64, 3, 4), (128, 1, 9)])
def test_gpu_forced_splits(h, t, splits):
    """One split (direct bf16 epilogue) and several (partials + the last CTA's combine)."""
    attn = _check(h, t, 32768, 512 if h == 64 else 1024, num_splits=splits)
    assert attn.num_splits == splits


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize("h", [64, 128])
def test_gpu_window_only(h):
    """SWA layers: the main list alone (no extra cache)."""
    t = 3
    q, (swa, swa_rows, idx), _, sink = dsv4_case(t, h, 4097, 512)
    idx[1, 100:] = -1  # holes
    attn = C.CuteSparseMQA(h, 512)
    attn.plan(t, 128)
    out = run_checked(attn, q, swa, idx, sink, 512**-0.5)
    assert rel_l2(out, reference(q, swa_rows, idx, sink, 512**-0.5)) < TOL


@pytest.mark.gpu
@needs_cute
@pytest.mark.parametrize("t", [1, 32])
def test_gpu_cuda_graph_replay(t):
    """run() captured once, replayed on new values written into the same tensors (batch 1
    splits: the combine counters must be back at 0 after every replay)."""
    attn = C.CuteSparseMQA(64, 512)
    graph_replay_matches_eager(attn, t, replays=3, check=lambda: not attn.counters.any())


@needs_cute
def test_launch_args_reach_the_kernel_as_runtime_values():
    """Every shape, stride and scalar is a runtime argument of the compiled kernel (a Python
    number would be folded in at compile time and ignored): 13 pointers + 13 geometry values +
    scale, rows, splits + the stream = 30 launch arguments. No GPU: CPU tensors, no launch."""
    import cuda.bindings.driver as cuda

    from sglang_dsv4.kernels.attention import fp8_rows_to_pages
    from sglang_dsv4.ref.kv_layout import pack_fp8_rows

    t, h = 3, 64
    attn = C.CuteSparseMQA(h, device="cpu", num_sms=132)
    attn.plan(t, 128, 64, num_splits=2, return_lse=True)
    cache = fp8_rows_to_pages(pack_fp8_rows(torch.randn(300, 512)), 64)
    q = torch.randn(t, h, 512).bfloat16()
    idx = torch.zeros(t, 128, dtype=torch.int32)
    xidx = torch.zeros(t, 64, dtype=torch.int32)
    key, args = attn.launch_args(
        q, cache, idx, torch.zeros(h), 0.04, extra_kv=cache, extra_indices=xidx, lengths=None,
        extra_lengths=torch.full((t,), 64, dtype=torch.int32), out=attn.out, lse=attn.lse,
    )  # fmt: skip
    assert key == C.KernelKey(64, True, False, True, True, True)
    packed, _ = C.compile_kernel(key).generate_execution_args(*args, cuda.CUstream(0))
    assert len(packed) == 30
    with pytest.raises(ValueError, match="16-byte aligned"):
        attn.launch_args(
            q[:, :, 1:], cache, idx, torch.zeros(h), 0.04, extra_kv=None, extra_indices=None,
            lengths=None, extra_lengths=None, out=attn.out, lse=None,
        )  # fmt: skip
