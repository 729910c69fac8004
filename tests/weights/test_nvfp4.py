import pytest
import torch
from served_model import served_tensors

from sglang_dsv4.ref.weight_quant import fp8_block_quant, mxfp4_quant, nvfp4_dequant
from sglang_dsv4.weights.layout import Fmt, StoredWeight
from sglang_dsv4.weights.loader import iter_safetensors
from sglang_dsv4.weights.names import hf_to_released
from sglang_dsv4.weights.nvfp4 import nvfp4_scope, to_nvfp4


def test_scopes():
    experts, linears = nvfp4_scope("experts"), nvfp4_scope("linears")
    assert nvfp4_scope(None) is None
    assert experts("layers.3.ffn.experts.7.w2.weight") and linears("mtp.0.ffn.experts.0.w1.weight")
    assert not experts("layers.3.ffn.shared_experts.w1.weight")
    assert linears("layers.3.ffn.shared_experts.w1.weight") and linears("layers.2.attn.wq_b.weight")
    assert linears("layers.2.attn.indexer.wq_b.weight")
    for name in ("layers.2.attn.wo_a.weight", "head.weight", "layers.2.attn.compressor.wkv.weight"):
        assert not linears(name), name
    with pytest.raises(ValueError, match="`nvfp4_on_load`: expected one of"):
        nvfp4_scope("everything")


def test_to_nvfp4_from_each_source():
    w = torch.randn(64, 256) * 0.05
    from_mx = StoredWeight(Fmt.MXFP4, *mxfp4_quant(w))
    nv = to_nvfp4(from_mx)
    assert nv.fmt is Fmt.NVFP4 and torch.equal(
        nv.dequant(torch.float32), from_mx.dequant(torch.float32)
    )
    assert nv.nbytes == 64 * 128 + 64 * 16 + 4
    for src in (StoredWeight(Fmt.FP8, *fp8_block_quant(w)), StoredWeight(Fmt.BF16, w.bfloat16())):
        nv = to_nvfp4(src)
        ref = src.dequant(torch.float32).float()
        got = nvfp4_dequant(nv.data, nv.scale, nv.global_scale)
        rel = (got - ref).norm() / ref.norm()
        assert 0 < rel < 0.15, (src.fmt, rel)  # FP4: ~2 significant bits
    assert to_nvfp4(nv) is nv


@pytest.mark.parametrize("fmt_dir", [0, 1], ids=["hf-dense", "released"])
def test_model_loads_with_nvfp4_experts(tiny_ckpt_pair, monkeypatch, fmt_dir):
    from transformers import AutoConfig

    import sglang_dsv4.model.deepseek_v4 as served

    ckpt = tiny_ckpt_pair[fmt_dir]
    want = hf_to_released(tiny_ckpt_pair[2].state_dict())
    config = AutoConfig.from_pretrained(ckpt)
    config.nvfp4_on_load = "experts"
    monkeypatch.setattr(served, "LogitsProcessor", lambda config: None)  # needs a server
    model = served.DeepseekV4ForCausalLM(config)
    model.load_weights(iter_safetensors(ckpt))
    params = served_tensors(model)
    experts = [n for n in want if ".ffn.experts." in n]
    others = [n for n in want if ".ffn.experts." not in n]
    assert all(torch.equal(params[n], want[n]) for n in others)
    # the experts hold MXFP4 values: from the released MXFP4 the scales are re-expressed and
    # NVFP4 keeps them exactly; quantizing the same values from dense (amax / 6 block scales)
    # rounds some of them
    exact = sum(torch.equal(params[n], want[n]) for n in experts)
    if fmt_dir == 1:
        assert exact == len(experts)
    else:
        diffs = [((params[n] - want[n]).norm() / want[n].norm()).item() for n in experts]
        assert max(diffs) < 0.15 and exact < len(experts)


def test_nvfp4_linears_kept_equal_the_dequantizing_path(tiny_ckpt_pair):
    """``nvfp4_on_load: linears`` on the GPU path (forced; kernels interpreted on CPU): linears
    kept as ``NVFP4Linear`` and experts as NVFP4 banks give the logits of the CPU path, which
    dequantizes the same NVFP4 values at load (fp32; only accumulation order differs)."""
    from served_model import load_served
    from torch import nn

    from sglang_dsv4.model.linears import NVFP4Linear

    rel_dir = tiny_ckpt_pair[1]
    kept = load_served(rel_dir, nvfp4="linears")
    dense = load_served(rel_dir, nvfp4="linears", kept=False)
    attn = kept.layers[2].attn
    assert isinstance(attn.wq_a, NVFP4Linear) and attn.wq_a.weight.dtype == torch.uint8
    assert isinstance(attn.indexer.wq_b, NVFP4Linear) and type(attn.wo_a) is nn.Linear
    assert kept.layers[0].ffn.experts.fmt is Fmt.NVFP4
    assert type(dense.layers[2].attn.wq_a) is nn.Linear
    ids = torch.randint(2, 1024, (20,), generator=torch.Generator().manual_seed(20))
    got, want = kept.ref(ids), dense.ref(ids)
    assert want.abs().max() > 0.1 and (got - want).abs().max() <= 1e-5
