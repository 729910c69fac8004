import pytest
import torch
from torch import nn

from sglang_dsv4.params import (
    DType,
    Norm,
    Role,
    Store,
    declare,
    model_specs,
    mtp_specs,
    param_specs,
    store_of,
)


def test_table_is_the_hf_model_plus_the_mtp_layer(hf_model, tiny_cfg):
    from sglang_dsv4.weights.names import hf_to_released

    released = hf_to_released(hf_model.state_dict())
    main = model_specs(tiny_cfg)
    assert {n: s.shape for n, s in main.items()} == {n: tuple(t.shape) for n, t in released.items()}
    full = param_specs(tiny_cfg)
    mtp = {n for n in full if n.startswith("mtp.0.")}
    assert set(full) == set(main) | mtp and set(mtp_specs(tiny_cfg, 0)) == mtp


def test_mtp_layer_rows(tiny_cfg):
    specs = mtp_specs(tiny_cfg, 0)
    d, hc = tiny_cfg.hidden_size, tiny_cfg.hc_mult
    assert (
        specs["mtp.0.e_proj.weight"].shape == (d, d)
        and specs["mtp.0.h_proj.weight"].store is Store.FP8
    )
    assert specs["mtp.0.hc_head_fn"].shape == (hc, hc * d)
    assert specs["mtp.0.hc_head_fn"].dtype is DType.FP32
    for n in ("enorm", "hnorm", "norm", "attn_norm", "attn.kv_norm"):
        assert specs[f"mtp.0.{n}.weight"].role is Role.NORM
    # SWA-only, score-routed: no compressor, no tid2eid; no embed / head of its own
    assert not any("compressor" in n or "indexer" in n or "tid2eid" in n for n in specs)
    assert "mtp.0.ffn.gate.bias" in specs and "mtp.0.embed.weight" not in specs
    assert "mtp.0.head.weight" not in specs


@pytest.mark.parametrize(
    ("name", "store"),
    [
        ("mtp.0.norm.weight", Store.BF16),
        ("layers.12.attn.compressor.ape", Store.FP32),
        ("layers.2.ffn.experts.31.w3.weight", Store.EXPERT),
        ("layers.2.ffn.shared_experts.w3.weight", Store.FP8),
        ("hc_head_scale", Store.FP32),
        ("mtp.1.h_proj.weight", Store.FP8),
    ],
)
def test_store_of_any_layer(name, store):
    assert store_of(name) is store


@pytest.mark.parametrize("name", ["layers.0.attn.wq_c.weight", "mtp.0.emb.tok_emb.weight", "x"])
def test_store_of_unknown_name_raises(name):
    with pytest.raises(KeyError, match="not a DSV4 tensor name"):
        store_of(name)


def test_declare_builds_the_module_tree(tiny_cfg):
    root = nn.Module()
    specs = mtp_specs(tiny_cfg, 0)
    torch.set_default_dtype(torch.float64)
    try:
        declare(root, specs.values(), strip="mtp.0.")
    finally:
        torch.set_default_dtype(torch.float32)
    tensors = dict(root.named_parameters()) | dict(root.named_buffers())
    assert {"mtp.0." + n: tuple(t.shape) for n, t in tensors.items()} == {
        n: s.shape for n, s in specs.items()
    }
    assert isinstance(root.enorm, Norm) and bool((root.enorm.weight == 1).all())
    assert isinstance(root.ffn.experts, nn.ModuleList) and len(root.ffn.experts) == 8
    assert isinstance(root.attn.wq_a, nn.Linear) and root.attn.wq_a.weight.dtype == torch.float64
    assert root.hc_attn_fn.dtype == torch.float32 and root.ffn.gate.bias.dtype == torch.float32
    assert "ffn.gate.bias" in dict(root.named_buffers())  # not trained by gradients
    assert bool((root.hc_attn_scale == 1).all()) and bool((root.attn.attn_sink == 0).all())
