"""``ops.moe``: the twin (:class:`MoeTorch`) over a layer's banks equals the reference MoE over
the per-expert checkpoint tensors; the kernel path (:class:`MoeTriton`, interpreted on CPU,
fp32) equals the twin in both kernel forms, for hash and scored layers; on the GPU, at Flash
dims, the kernel path in bf16 against the fp32 twin and under CUDA-graph replay."""

import json
from importlib import resources

import pytest
import torch
from served_model import default_dtype

from sglang_dsv4.kernels.moe_group import ONE_PROGRAM_MAX
from sglang_dsv4.model.experts import MoE
from sglang_dsv4.model.linears import KeptFormats
from sglang_dsv4.ops import build_ops
from sglang_dsv4.ops import moe as ops_moe
from sglang_dsv4.perf.op_count import count_ops
from sglang_dsv4.ref.moe import moe, route_hash, route_scores, route_topk, route_weights
from sglang_dsv4.weights.layout import Fmt, StoredWeight

GPU = torch.cuda.is_available()


def _random_gate(layer, cfg, spec, g, device) -> None:
    """The router's random weights: a scaled gate, hash ids (hash layers) or a bias."""
    with torch.no_grad():
        layer.gate.weight.copy_(torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=g,
                                            device=device))  # fmt: skip
        layer.gate.weight.mul_(cfg.hidden_size**-0.5)
        if spec.hash_moe:
            tid = torch.randint(0, cfg.n_routed_experts, layer.gate.tid2eid.shape, device=device)
            layer.gate.tid2eid.copy_(tid)
        else:
            layer.gate.bias.copy_(0.1 * torch.randn(cfg.n_routed_experts, device=device))


def layer_of(cfg, index: int, device="cpu", dtype=torch.float32, seed=0):
    """A MoE block with random weights stored through ``MoE.store`` (the loader's path) and
    the per-expert tensors it was given."""
    spec = cfg.layers[index]
    with torch.device(device), default_dtype(dtype):
        layer = MoE(cfg, spec, KeptFormats(cfg, None, on_gpu=False), f"layers.{index}.ffn.")
    g = torch.Generator(device=device).manual_seed(seed)
    d, inter = cfg.hidden_size, cfg.moe_inter_dim
    _random_gate(layer, cfg, spec, g, device)
    tensors = {}
    names = [f"experts.{e}." for e in range(cfg.n_routed_experts)] + ["shared_experts."]
    for p in names:
        width = inter * (cfg.n_shared_experts if p == "shared_experts." else 1)
        for k, shape in (("w1", (width, d)), ("w2", (d, width)), ("w3", (width, d))):
            w = (torch.randn(shape, generator=g, device=device) * shape[1] ** -0.5).to(dtype)
            tensors[p + k] = w
            assert layer.store(p + k + ".weight", StoredWeight(Fmt.BF16, w))
    return layer, tensors


def reference(cfg, layer, tensors, x, ids):
    gate = layer.gate
    scores = route_scores(x, gate.weight, cfg.scoring_func)
    if layer.hash_moe:
        chosen = route_hash(ids, gate.tid2eid)
    else:
        chosen = route_topk(scores, gate.bias, cfg.n_experts_per_tok)
    weights = route_weights(scores, chosen, cfg.routed_scaling_factor)
    n = cfg.n_routed_experts
    per = [[tensors[f"experts.{e}.{k}"] for e in range(n)] for k in ("w1", "w2", "w3")]
    shared = tuple(tensors[f"shared_experts.{k}"] for k in ("w1", "w2", "w3"))
    return moe(x, chosen, weights, *per, shared, cfg.swiglu_limit)


@pytest.mark.parametrize("index", [0, 2], ids=["hash", "scored"])
def test_twin_over_banks_equals_reference_over_checkpoint_tensors(tiny_cfg, index):
    layer, tensors = layer_of(tiny_cfg, index)
    assert layer.shared_row == tiny_cfg.n_routed_experts and layer.experts.w13.shape[0] == 9
    ops = build_ops(tiny_cfg, "cpu")
    assert type(ops.moe) is ops_moe.MoeTorch
    x = torch.randn(11, tiny_cfg.hidden_size)
    ids = torch.randint(0, tiny_cfg.vocab_size, (11,))
    assert torch.equal(ops.moe.ffn(layer, x, ids), reference(tiny_cfg, layer, tensors, x, ids))


def test_wide_shared_expert_is_a_bank_of_its_own(tiny_cfg, tiny_dict):
    """Two shared experts (twice the width): not a routed-bank row but a one-row bank, run by
    the same kernels (top-k 0) and by the twin as the reference."""
    from sglang_dsv4.config import DSV4Config

    cfg = DSV4Config.from_dict(tiny_dict | {"n_shared_experts": 2})
    layer, tensors = layer_of(cfg, 2)
    assert layer.shared_row is None and layer.shared.w13.shape == (1, 4 * cfg.moe_inter_dim, 256)
    x = torch.randn(3, cfg.hidden_size)
    ids = torch.randint(0, cfg.vocab_size, (3,))
    want = reference(cfg, layer, tensors, x, ids)
    assert torch.equal(ops_moe.MoeTorch(cfg).ffn(layer, x, ids), want)
    if not GPU:
        got = ops_moe.MoeTriton(cfg, "cpu").ffn(layer, x, ids)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("index", [0, 2], ids=["hash", "scored"])
@pytest.mark.parametrize("t", [1, 9], ids=["slots", "sorted"])
def test_kernels_equal_twin_interpreted(tiny_cfg, index, t):
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    layer, _ = layer_of(tiny_cfg, index)
    kern = build_ops(tiny_cfg, "cpu", kernels=True).moe
    assert type(kern) is ops_moe.MoeTriton
    assert kern.form(layer, t) == ("slots" if t == 1 else "sorted")
    x = torch.randn(t, tiny_cfg.hidden_size) * 2
    ids = torch.randint(0, tiny_cfg.vocab_size, (t,))
    got = kern.ffn(layer, x, ids)
    want = ops_moe.MoeTorch(tiny_cfg).ffn(layer, x, ids)
    assert not got.isnan().any()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def served_layer(cfg, index: int, device="cpu", seed=0):
    """A MoE block as the served model holds it on the GPU (``KeptFormats`` on_gpu: routed
    experts an MXFP4 bank, the FP8 shared expert a one-row bank of its own), random weights
    quantized and stored through ``MoE.store``."""
    from sglang_dsv4.ref.weight_quant import fp8_block_quant, mxfp4_quant

    spec = cfg.layers[index]
    with torch.device(device):
        layer = MoE(cfg, spec, KeptFormats(cfg, None, on_gpu=True), f"layers.{index}.ffn.")
    assert layer.fp4 and layer.shared is not None and layer.shared.fmt is Fmt.FP8
    g = torch.Generator(device=device).manual_seed(seed)
    d, inter = cfg.hidden_size, cfg.moe_inter_dim
    _random_gate(layer, cfg, spec, g, device)
    names = [f"experts.{e}." for e in range(cfg.n_routed_experts)] + ["shared_experts."]
    for p in names:
        for k, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            w = torch.randn(shape, generator=g, device=device) * shape[1] ** -0.5
            if p == "shared_experts.":
                stored = StoredWeight(Fmt.FP8, *fp8_block_quant(w))
            else:
                stored = StoredWeight(Fmt.MXFP4, *mxfp4_quant(w))
            assert layer.store(p + k + ".weight", stored)
    return layer


def before(kern, layer, x, ids):
    """main's MoeTriton.ffn before the shared bank's rows went into the routed slot sum: the
    shared bank run with top-k 0 (its own grouping launch and slot sum), then a torch add."""
    limit = kern.cfg.swiglu_limit
    chosen, weights = kern.route(layer, x, ids)
    form = kern.form(layer, x.shape[0])
    out = layer.experts.grouped(x, chosen, weights, limit, form, layer.shared_row)
    return out + layer.shared.grouped(x, chosen[:, :0], weights[:, :0], limit, form, 0)


def quantized_tiny(tiny_dict):
    from sglang_dsv4.config import DSV4Config

    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}  # fmt: skip
    return DSV4Config.from_dict(tiny_dict | {"expert_dtype": "fp4", "quantization_config": quant})


@pytest.mark.parametrize("t", [2, 9], ids=["slots", "sorted"])
def test_shared_bank_rows_in_the_slot_sum_same_bits_interpreted(tiny_dict, t):
    """The served layer's structure (MXFP4 routed bank, FP8 shared bank): the shared bank in the
    routed launches (slot form) or its rows added in the routed slot sum (sorted) give the bits
    of the path before (shared bank with its own launches, grouping and slot sum, then a torch
    add); one call launches the route kernel and the two slot kernels (slot form), or the two
    GEMMs of each bank + the routed grouping and slot sum (sorted), no torch kernel."""
    if GPU:
        pytest.skip("interpreter shapes; the GPU tests cover real shapes")
    cfg = quantized_tiny(tiny_dict)
    layer = served_layer(cfg, 2)
    kern = ops_moe.MoeTriton(cfg, "cpu")
    assert kern.form(layer, t) == ("slots" if t == 2 else "sorted")
    x = torch.randn(t, cfg.hidden_size) * 2
    ids = torch.randint(0, cfg.vocab_size, (t,))
    counts, got = count_ops(lambda: kern.ffn(layer, x, ids))
    want = before(kern, layer, x, ids)
    assert not got.isnan().any() and torch.equal(got.view(torch.int32), want.view(torch.int32))
    launches = {"_route_kernel": 1, "_slot_w13_kernel": 1, "_slot_w2_kernel": 1}
    if t == 9:
        launches = {"_route_kernel": 1, "_sorted_w13_kernel": 2, "_sorted_w2_kernel": 2,
                    "_group_one_kernel": 1, "_slot_sum_kernel": 1}  # fmt: skip
    assert counts.triton == launches and not counts.device


@pytest.mark.gpu
@pytest.mark.parametrize("index", [0, 1], ids=["hash", "scored"])
@pytest.mark.parametrize("t", [1, 4, 32, 128, 1024, 8192])
def test_gpu_served_flash_layer_same_bits_as_before_and_graph_safe(index, t):
    """The Flash-dims served layer (d 4096, 16 MXFP4 experts of 1024, top-2, FP8 shared bank)
    in bf16: the shared bank in the routed launches / slot sum has the bits of the path before;
    captured in a CUDA graph and replayed on new tokens it equals eager; launches: 3 (slot
    form) or 7-8 (sorted), no torch kernel."""
    from sglang_dsv4.config import DSV4Config

    path = resources.files("sglang_dsv4.configs").joinpath("dsv4-flash-dims.json")
    cfg = DSV4Config.from_dict(json.loads(path.read_text()))
    layer = served_layer(cfg, index, "cuda")
    kern = ops_moe.moe_ops(cfg, torch.device("cuda"), True)
    x = torch.randn(t, cfg.hidden_size, device="cuda").bfloat16() * 2
    ids = torch.randint(0, cfg.vocab_size, (t,), device="cuda")
    kern.ffn(layer, x, ids)  # compile outside the capture
    want = before(kern, layer, x, ids)
    counts, got = count_ops(lambda: kern.ffn(layer, x, ids))
    assert not got.isnan().any() and torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not counts.device and counts.kernels == (
        3 if t <= 4 else 7 if t * 2 <= ONE_PROGRAM_MAX else 8
    )
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = kern.ffn(layer, x, ids)
    x.copy_(torch.randn_like(x) * 2)
    ids.copy_(torch.randint(0, cfg.vocab_size, (t,), device="cuda"))
    graph.replay()
    assert torch.equal(static, kern.ffn(layer, x, ids))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4, 64, 1024])
def test_kernels_gpu_flash_dims_bf16(t):
    """Flash-dims layer (d 4096, 16 experts of 1024, top-6 here, shared expert) in bf16 against
    the twin in fp32 on the same weights, through CUDA-graph capture and replay."""
    from sglang_dsv4.config import DSV4Config

    path = resources.files("sglang_dsv4.configs").joinpath("dsv4-flash-dims.json")
    raw = json.loads(path.read_text())
    cfg = DSV4Config.from_dict(raw | {"num_experts_per_tok": 6})
    layer, _ = layer_of(cfg, 1, "cuda", torch.bfloat16)
    kern = ops_moe.moe_ops(cfg, torch.device("cuda"), True)
    x = torch.randn(t, cfg.hidden_size, device="cuda").bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (t,), device="cuda")
    kern.ffn(layer, x, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = kern.ffn(layer, x, ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    eager = kern.ffn(layer, x, ids)
    assert torch.equal(static, eager)
    want = ops_moe.MoeTorch(cfg).ffn(layer.float(), x.float(), ids)  # fp32 copy of the weights
    # per token: a near-tie in the top-k may pick another expert under another summation order
    err = (static.float() - want).norm(dim=1) / want.norm(dim=1)
    assert not static.isnan().any() and (err <= 2e-2).float().mean() >= 0.99, err.max()
