"""The served model with released-format weights kept quantized (its CUDA path): FP8 linears in
``FP8Linear``, FP4 routed experts as banks run by the grouped kernel, FP8 routed experts (and the
FP8 shared expert, bank row E) as one e4m3 ``StackedExperts`` bank per layer (next to MXFP4
experts the shared expert is a one-row FP8 bank); ``wo_a`` dense
(NVFP4-on-load linears in ``NVFP4Linear``: on CPU in tests/weights/test_nvfp4.py, on the GPU in
the graph test here).

CPU: the path is forced (the device decision ``keeps_quantized`` monkeypatched) and the kernels
run under ``TRITON_INTERPRET=1`` (tests/conftest.py), fp32. GPU (``gpu`` marker): the same model
on CUDA against the dequantized reference, a CUDA-graph capture + replay of its MoE / FP8 path,
and its memory next to the checkpoint's.
"""

import copy
import logging

import pytest
import torch
from served_model import load_served as load
from served_model import served_tensors
from torch import nn

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.model.experts import FP4Experts, StackedExperts
from sglang_dsv4.model.linears import FP8Linear, NVFP4Linear
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.weights.layout import Fmt, logical_shapes
from sglang_dsv4.weights.loader import iter_safetensors
from sglang_dsv4.weights.names import hf_to_released

FP8_LINEARS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.shared_experts.w1")


@pytest.fixture(scope="module", params=["fp4", "fp8"], ids=["mxfp4-experts", "fp8-experts"])
def released(request, tiny_ckpt_pair, hf_model, tiny_dict, tmp_path_factory):
    """(released dir, its dequantized weights as the HF oracle holds them, expert dtype)."""
    from sglang_dsv4.weights.make import make_checkpoints

    if request.param == "fp4":
        _, rel_dir, oracle = tiny_ckpt_pair
    else:
        oracle = copy.deepcopy(hf_model)
        out = tmp_path_factory.mktemp("tiny_fp8_experts")
        _, rel_dir = make_checkpoints(
            tiny_dict, out, model=oracle, expert_dtype="fp8", shard_bytes=1 << 20
        )
    return rel_dir, hf_to_released(oracle.state_dict()), request.param


def ids_of(n: int, device="cpu") -> torch.Tensor:
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(n)).to(device)


def test_kept_model_equals_dequantized_reference(released, tiny_cfg, caplog):
    rel_dir, weights, expert_dtype = released
    with caplog.at_level(logging.INFO, logger="sglang_dsv4.model.deepseek_v4"):
        model = load(rel_dir)
    # 4 per layer (wq_a wq_b wkv wo_b) + 2 indexer.wq_b; the FP8 shared expert is a row of the
    # layer's FP8 bank (FP8 experts) or a one-row FP8 bank of its own (MXFP4 experts)
    want_log = (
        "{'fp8 linear': 26, 'mxfp4 expert bank': 6, 'fp8 expert bank': 6}"
        if expert_dtype == "fp4"
        else ("{'fp8 linear': 26, 'fp8 expert bank': 6}")
    )
    assert f"kept quantized (not dequantized): {want_log}" in caplog.text
    params = served_tensors(model)
    for i in range(len(model.layers)):
        for lin in FP8_LINEARS[:-1]:
            name = f"layers.{i}.{lin}"
            assert isinstance(model.get_submodule(name), FP8Linear), name
            assert params[name + ".weight"].dtype == torch.float8_e4m3fn  # no dense copy
            assert model.ref.w[name + ".weight"] is model.get_submodule(name)
        assert type(model.layers[i].attn.wo_a) is nn.Linear  # run dense, as the reference
        ffn = model.layers[i].ffn
        experts = ffn.experts
        shared_w1 = params[f"layers.{i}.{FP8_LINEARS[-1]}.weight"]
        assert shared_w1.dtype == torch.float8_e4m3fn  # a bank view, no dense copy
        if expert_dtype == "fp4":
            assert isinstance(experts, FP4Experts) and experts.fmt is Fmt.MXFP4
            assert isinstance(ffn.shared, StackedExperts) and ffn.shared.fmt is Fmt.FP8
            assert ffn.shared.w13.shape[0] == 1 and ffn.shared_row is None
        else:
            assert isinstance(experts, StackedExperts) and experts.fmt is Fmt.FP8
            assert experts.w13.dtype == torch.float8_e4m3fn and experts.w13.shape[0] == 9
            assert model.layers[i].ffn.shared_row == 8
    assert isinstance(model.layers[2].attn.indexer.wq_b, FP8Linear)
    ids = ids_of(24)
    got = model.ref(ids)
    want = RefDSV4(tiny_cfg, weights)(ids)
    err = (got - want).abs().max().item()
    print(f"{expert_dtype} experts: max |logit diff| kept vs dequantized = {err:.2e}")
    assert want.abs().max() > 0.1 and err <= 1e-5


def model_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_report(rel_dir, model) -> tuple[int, int, int]:
    """(model bytes, checkpoint bytes without MTP, the same model all in BF16)."""
    ckpt = sum(t.nbytes for n, t in iter_safetensors(rel_dir) if not n.startswith("mtp."))
    cfg = DSV4Config.from_json(rel_dir / "config.json")
    bf16 = sum(2 * torch.Size(s).numel() for s in logical_shapes(cfg, mtp=False).values())
    got = model_bytes(model)
    print(f"model {got / 2**20:.2f} MiB, checkpoint {ckpt / 2**20:.2f}, bf16 {bf16 / 2**20:.2f}")
    return got, ckpt, bf16


def test_loaded_bytes_are_the_checkpoints(tiny_ckpt_pair):
    """BF16 model: its bytes are the checkpoint's (+ wo_a in BF16 instead of FP8), not BF16's."""
    rel_dir = tiny_ckpt_pair[1]
    got, ckpt, bf16 = memory_report(rel_dir, load(rel_dir, dtype=torch.bfloat16))
    assert got <= 1.05 * ckpt and got < 0.6 * bf16


# ---- GPU ---------------------------------------------------------------------------------


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_kept_model_equals_dequantized_reference(released, tiny_cfg, dtype):
    """fp32 activations: the kernels' fp32 (IEEE) path, tight. bf16: bounded by twice the
    error of the dequantize-at-load bf16 model of the same checkpoint (both against fp32)."""
    rel_dir, weights, expert_dtype = released
    model = load(rel_dir, device="cuda", dtype=dtype)
    assert isinstance(model.layers[0].attn.wq_a, FP8Linear)
    assert model.layers[0].attn.wq_a.weight.is_cuda
    ids = ids_of(300, "cuda")
    want = RefDSV4(tiny_cfg, {n: t.cuda() for n, t in weights.items()})(ids)
    got = model.ref(ids)
    err = rel_l2(got, want)
    if dtype == torch.float32:
        print(f"{expert_dtype} experts fp32: max |d| {(got - want).abs().max():.2e}")
        assert (got - want).abs().max() <= 1e-4
        return
    # today's bf16 model: the same checkpoint dequantized at load
    ref_err = rel_l2(load(rel_dir, kept=False, device="cuda", dtype=dtype).ref(ids), want)
    print(f"{expert_dtype} experts bf16: rel L2 kept {err:.2e}, dense bf16 reference {ref_err:.2e}")
    assert err <= max(2 * ref_err, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("nvfp4", [None, "linears"])
def test_gpu_graph_replay_equals_eager(released, tiny_cfg, nvfp4):
    """A CUDA graph of two MoE blocks through the served path (``ops.moe``: routing kernel +
    grouped expert kernels; hash and scored routing) and the FP8 / NVFP4 linears of an
    attention block, replayed on new inputs, equals eager on those; the MoE blocks equal the
    reference ``ref.ffn``."""
    rel_dir, _, expert_dtype = released
    model = load(rel_dir, device="cuda", nvfp4=nvfp4)
    ref, attn = model.ref, model.layers[2].attn
    assert isinstance(attn.wq_a, NVFP4Linear if nvfp4 else FP8Linear)
    specs = tiny_cfg.layers[:2]

    def step(x: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        outs = [model.ops.moe.ffn(model.layers[s.index].ffn, x, ids) for s in specs]
        return [*outs, attn.wq_a(x), attn.wo_b(x[:, : attn.wo_b.in_features])]

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, tiny_cfg.hidden_size, device="cuda", generator=g)
    ids = torch.randint(2, 1024, (8,), device="cuda", generator=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x, ids)  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step(x, ids)
    for trial in range(2):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g) * (1 + 3 * trial))
        ids.copy_(torch.randint(2, 1024, ids.shape, device="cuda", generator=g))
        graph.replay()
        eager = step(x, ids)
        for out, want in zip(static, eager, strict=True):
            assert not out.isnan().any() and rel_l2(out, want) <= 1e-5
        for s, out in zip(specs, static, strict=False):
            assert rel_l2(out, ref.ffn(s, x, ids)) <= 1e-4
    print(f"{expert_dtype} experts, nvfp4={nvfp4}: graph replay == eager")


@pytest.mark.gpu
def test_gpu_loaded_bytes_are_the_checkpoints(tiny_ckpt_pair):
    rel_dir = tiny_ckpt_pair[1]
    model = load(rel_dir, device="cuda", dtype=torch.bfloat16)
    got, ckpt, bf16 = memory_report(rel_dir, model)
    assert all(t.is_cuda for t in model.buffers())
    assert got <= 1.05 * ckpt and got < 0.6 * bf16
