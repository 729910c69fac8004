"""Tensor parallelism of the served model (``sglang_dsv4/model/tp.py``): the split of the
config and of checkpoint tensors (dense and quantized), and a real ``--tp 2`` SGLang server on
CPU (gloo) giving the greedy tokens and logprobs of the one-rank server."""

import dataclasses

import pytest
import torch
from conftest import SERVER_ARGS

from sglang_dsv4.model.tp import TP, TPError, check_split
from sglang_dsv4.ref.weight_quant import fp8_block_quant, mxfp4_quant
from sglang_dsv4.weights.layout import Fmt, StoredWeight

LOGPROB_TOL = 1e-5  # issue 17: TP logprobs equal to one rank's within 1e-5 (fp32)


def _never_kept(name):
    return None


def _always_kept(name):
    return Fmt.FP8


def test_local_cfg_splits_heads_groups_and_expert_columns(tiny_cfg):
    local = TP(2, 1).local_cfg(tiny_cfg)
    assert local.num_heads * 2 == tiny_cfg.num_heads
    assert local.o_groups * 2 == tiny_cfg.o_groups
    assert local.moe_inter_dim * 2 == tiny_cfg.moe_inter_dim
    # replicated: the K=V head, indexer, experts' count, vocabulary
    for same in ("head_dim", "index_n_heads", "n_routed_experts", "vocab_size", "hidden_size"):
        assert getattr(local, same) == getattr(tiny_cfg, same)
    assert TP().local_cfg(tiny_cfg) is tiny_cfg


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("num_heads", 5, "num_attention_heads = 5"),
        ("o_groups", 1, "o_groups = 1"),
        ("moe_inter_dim", 129, "moe_intermediate_size = 129"),
    ],
)
def test_undivisible_dims_are_named(tiny_cfg, field, value, named):
    cfg = dataclasses.replace(tiny_cfg, **{field: value})
    with pytest.raises(TPError, match=named):
        check_split(cfg, 2)
    check_split(tiny_cfg, 2)  # the tiny model splits over 2 ranks


def test_split_table():
    assert TP.split_dim("layers.3.attn.wq_b.weight") == 0
    assert TP.split_dim("layers.3.attn.attn_sink") == 0
    assert TP.split_dim("layers.3.attn.wo_a.weight") == 0
    assert TP.split_dim("layers.3.attn.wo_b.weight") == 1
    assert TP.split_dim("layers.0.ffn.experts.7.w3.weight") == 0
    assert TP.split_dim("layers.0.ffn.shared_experts.w2.weight") == 1
    for whole in (
        "layers.3.attn.wkv.weight",
        "layers.3.attn.wq_a.weight",
        "layers.3.attn.indexer.wq_b.weight",
        "layers.3.attn.compressor.wkv.weight",
        "layers.0.ffn.gate.weight",
        "embed.weight",  # SGLang's vocabulary-parallel modules cut these
        "head.weight",
    ):
        assert TP.split_dim(whole) is None, whole


def test_dense_parts_concatenate_to_the_whole():
    w = torch.randn(8, 6)
    for name, dim in (("layers.1.attn.wq_b.weight", 0), ("layers.1.attn.wo_b.weight", 1)):
        parts = [
            TP(2, r).shard(name, StoredWeight(Fmt.FP32, w), torch.float32, _never_kept).data
            for r in range(2)
        ]
        assert torch.equal(torch.cat(parts, dim), w)
    same = TP(2, 1).shard("layers.1.attn.wkv.weight", StoredWeight(Fmt.FP32, w), None, None)
    assert same.data is w


@pytest.mark.parametrize("dim", [0, 1])
def test_fp8_parts_on_block_boundaries_stay_fp8_and_match_the_whole(dim):
    """A rank's FP8 part is whole 128x128 blocks: it stays FP8 and dequantizes to the same
    numbers as the whole tensor's slice."""
    w = torch.randn(512, 256)
    data, scale = fp8_block_quant(w)
    whole = StoredWeight(Fmt.FP8, data, scale).dequant(torch.float32)
    name = "layers.1.attn.wo_b.weight" if dim else "layers.1.attn.wq_b.weight"
    for r in range(2):
        part = TP(2, r).shard(name, StoredWeight(Fmt.FP8, data, scale), torch.float32, _always_kept)
        assert part.fmt is Fmt.FP8
        step = whole.shape[dim] // 2
        assert torch.equal(part.dequant(torch.float32), whole.narrow(dim, r * step, step))


def test_fp8_split_inside_a_block_dequantizes_or_refuses():
    w = torch.randn(128, 256)  # 64 rows per rank: half a block
    data, scale = fp8_block_quant(w)
    whole = StoredWeight(Fmt.FP8, data, scale).dequant(torch.float32)
    name = "layers.1.attn.wq_b.weight"
    part = TP(2, 1).shard(name, StoredWeight(Fmt.FP8, data, scale), torch.float32, _never_kept)
    assert part.fmt is Fmt.DENSE and torch.equal(part.data, whole[64:])
    with pytest.raises(TPError, match="not a whole number of its fp8 blocks"):
        TP(2, 1).shard(name, StoredWeight(Fmt.FP8, data, scale), torch.float32, _always_kept)


def test_mxfp4_w2_columns_split_on_scale_groups():
    """An MXFP4 expert's w2 is split along its input (packed, 32-wide scale groups)."""
    w = torch.randn(64, 256)
    packed, scale = mxfp4_quant(w)
    whole = StoredWeight(Fmt.MXFP4, packed, scale).dequant(torch.float32)
    name = "layers.2.ffn.experts.5.w2.weight"
    for r in range(4):
        stored = StoredWeight(Fmt.MXFP4, packed, scale)
        part = TP(4, r).shard(name, stored, torch.float32, _always_kept)
        assert part.fmt is Fmt.MXFP4
        assert torch.equal(part.dequant(torch.float32), whole[:, r * 64 : (r + 1) * 64])


def _tokens_and_logprobs(server, prompt, n):
    out = server.generate(prompt, n)
    meta = out["meta_info"]
    prompt_lp = [lp for lp, *_ in meta["input_token_logprobs"][1:]]
    return out["output_ids"], [lp for lp, *_ in meta["output_token_logprobs"]], prompt_lp


@pytest.fixture(scope="module")
def tp2_server(tiny_checkpoint, tmp_path_factory):
    """The tiny fp32 checkpoint served with ``--tp 2`` on CPU (two scheduler ranks, gloo)."""
    from server import Server

    log = tmp_path_factory.mktemp("logs") / "tp2_server.log"
    srv = Server(["--model-path", str(tiny_checkpoint), *SERVER_ARGS, "--tp", "2"], log)
    yield srv
    srv.stop()


@pytest.mark.server
def test_tp2_server_equals_one_rank(tiny_server, tp2_server):
    """Greedy tokens equal and every prompt / output logprob within 1e-5 of the one-rank
    server, for prompts inside the window and past it (c4 / c128 entries, indexer top-k
    choosing 16 of up to 162 entries)."""
    g = torch.Generator().manual_seed(17)
    prompts = [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (9, 200, 650)]
    for prompt in prompts:
        ids1, out1, in1 = _tokens_and_logprobs(tiny_server, prompt, 24)
        ids2, out2, in2 = _tokens_and_logprobs(tp2_server, prompt, 24)
        assert ids2 == ids1, f"prompt of {len(prompt)}"
        diff = (torch.tensor(out1 + in1) - torch.tensor(out2 + in2)).abs().max().item()
        print(f"prompt of {len(prompt)}: tokens equal, max |dlogprob| {diff:.2e}")
        assert diff <= LOGPROB_TOL, f"prompt of {len(prompt)}: max |dlogprob| {diff:.2e}"
    log = tp2_server.log
    assert "TP0" in log and "TP1" in log and "DSV4 --tp 2 on CPU (gloo)" in log


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_gpu_server_equals_one_gpu(tiny_checkpoint, tmp_path):
    """On 2 GPUs (NCCL, CUDA graphs): every prompt logprob of the fp32 tiny model within 1e-3
    of one GPU (bf16 cache rows, rounded from inputs that differ by the all-reduce's summation
    order) and the same first greedy token."""
    from server import Server

    args = ["--model-path", str(tiny_checkpoint), *SERVER_ARGS, "--kv-cache-dtype", "bfloat16"]
    one = Server(args, tmp_path / "tp1.log")
    try:
        base = [one.generate(p, 4) for p in _gpu_prompts()]
    finally:
        one.stop()
    two = Server([*args, "--tp", "2"], tmp_path / "tp2.log")
    try:
        runs = [two.generate(p, 4) for p in _gpu_prompts()]
    finally:
        two.stop()
    for a, b in zip(base, runs, strict=True):
        lp_a = [lp for lp, *_ in a["meta_info"]["input_token_logprobs"][1:]]
        lp_b = [lp for lp, *_ in b["meta_info"]["input_token_logprobs"][1:]]
        assert (torch.tensor(lp_a) - torch.tensor(lp_b)).abs().max().item() <= 1e-3
        assert a["output_ids"][0] == b["output_ids"][0]


def _gpu_prompts():
    g = torch.Generator().manual_seed(17)
    return [torch.randint(2, 1024, (n,), generator=g).tolist() for n in (9, 200, 650)]
