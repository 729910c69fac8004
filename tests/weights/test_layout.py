import pytest
import torch
from served_model import served_tensors

from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.weights.layout import Fmt, logical_shapes, released_fmt, stored_specs
from sglang_dsv4.weights.names import hf_to_released


def test_logical_shapes_are_the_hf_model_tensors(hf_model, tiny_cfg):
    shapes = logical_shapes(tiny_cfg, mtp=False)
    released = hf_to_released(hf_model.state_dict())
    assert shapes == {n: tuple(t.shape) for n, t in released.items()}
    assert set(shapes) == set(RefDSV4.required_names(type("R", (), {"cfg": tiny_cfg})()))


def test_served_model_parameters_have_the_logical_shapes(tiny_dict, tiny_cfg, monkeypatch):
    from transformers import DeepseekV4Config

    import sglang_dsv4.model.deepseek_v4 as served

    monkeypatch.setattr(served, "LogitsProcessor", lambda config: None)  # needs a server
    model = served.DeepseekV4ForCausalLM(DeepseekV4Config(**tiny_dict))
    params = served_tensors(model)
    assert {n: tuple(p.shape) for n, p in params.items()} == logical_shapes(tiny_cfg, mtp=False)


def test_mtp_layer_is_a_full_swa_block_plus_its_projections(tiny_cfg):
    shapes = logical_shapes(tiny_cfg)
    mtp = {n.removeprefix("mtp.0.") for n in shapes if n.startswith("mtp.0.")}
    assert {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight"} < mtp
    assert {"hc_head_fn", "hc_head_base", "hc_head_scale", "attn.wq_a.weight"} < mtp
    assert "ffn.gate.bias" in mtp and not any("compressor" in n for n in mtp)


@pytest.mark.parametrize(
    ("name", "fp4", "fp8"),
    [
        ("embed.weight", Fmt.BF16, Fmt.BF16),
        ("head.weight", Fmt.BF16, Fmt.BF16),
        ("norm.weight", Fmt.BF16, Fmt.BF16),
        ("hc_head_fn", Fmt.FP32, Fmt.FP32),
        ("layers.3.hc_attn_base", Fmt.FP32, Fmt.FP32),
        ("layers.3.attn_norm.weight", Fmt.BF16, Fmt.BF16),
        ("layers.3.attn.wq_a.weight", Fmt.FP8, Fmt.FP8),
        ("layers.3.attn.q_norm.weight", Fmt.BF16, Fmt.BF16),
        ("layers.3.attn.wo_a.weight", Fmt.FP8, Fmt.FP8),
        ("layers.3.attn.attn_sink", Fmt.FP32, Fmt.FP32),
        ("layers.3.attn.compressor.wkv.weight", Fmt.BF16, Fmt.BF16),
        ("layers.3.attn.compressor.ape", Fmt.FP32, Fmt.FP32),
        ("layers.2.attn.indexer.wq_b.weight", Fmt.FP8, Fmt.FP8),
        ("layers.2.attn.indexer.weights_proj.weight", Fmt.BF16, Fmt.BF16),
        ("layers.2.attn.indexer.compressor.wgate.weight", Fmt.BF16, Fmt.BF16),
        ("layers.2.attn.indexer.compressor.norm.weight", Fmt.BF16, Fmt.BF16),
        ("layers.0.ffn.gate.tid2eid", Fmt.I64, Fmt.I64),
        ("layers.2.ffn.gate.weight", Fmt.BF16, Fmt.BF16),
        ("layers.2.ffn.gate.bias", Fmt.FP32, Fmt.FP32),
        ("layers.2.ffn.experts.7.w2.weight", Fmt.MXFP4, Fmt.FP8),
        ("layers.2.ffn.shared_experts.w1.weight", Fmt.FP8, Fmt.FP8),
        ("mtp.0.e_proj.weight", Fmt.FP8, Fmt.FP8),
        ("mtp.0.hc_head_scale", Fmt.FP32, Fmt.FP32),
        ("mtp.0.ffn.experts.0.w1.weight", Fmt.MXFP4, Fmt.FP8),
    ],
)
def test_released_storage_of_each_tensor_kind(name, fp4, fp8):
    assert released_fmt(name, "fp4") is fp4
    assert released_fmt(name, "fp8") is fp8


def test_stored_specs_partial_tiles_and_fp4_packing():
    # q_lora_rank 64 < 128: one partial tile row, not padded
    fp8 = stored_specs("layers.0.attn.wq_a.weight", (64, 256), Fmt.FP8)
    assert {n: (s.shape, s.dtype) for n, s in fp8.items()} == {
        "layers.0.attn.wq_a.weight": ((64, 256), torch.float8_e4m3fn),
        "layers.0.attn.wq_a.scale": ((1, 2), torch.float8_e8m0fnu),
    }
    fp4 = stored_specs("layers.0.ffn.experts.1.w1.weight", (128, 256), Fmt.MXFP4)
    assert {n: (s.shape, s.dtype) for n, s in fp4.items()} == {
        "layers.0.ffn.experts.1.w1.weight": ((128, 128), torch.int8),
        "layers.0.ffn.experts.1.w1.scale": ((128, 8), torch.float8_e8m0fnu),
    }
    dense = stored_specs("embed.weight", (10, 4), Fmt.DENSE)["embed.weight"]
    assert dense.matches(torch.zeros(10, 4)) and dense.matches(torch.zeros(10, 4).bfloat16())
    assert not dense.matches(torch.zeros(10, 4, dtype=torch.int32))
    assert not dense.matches(torch.zeros(10, 5))
