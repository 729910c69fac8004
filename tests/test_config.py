import json
from pathlib import Path

import pytest

from sglang_dsv4.config import AttnKind, ConfigError, DSV4Config, released_fields

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def kinds(cfg: DSV4Config) -> list[AttnKind]:
    return [s.attn for s in cfg.layers]


def test_flash_schedule_matches_release():
    cfg = DSV4Config.from_json(CONFIGS / "dsv4-flash.json")
    assert cfg.num_layers == 43 and len(cfg.layers) == 43
    assert kinds(cfg)[:2] == [AttnKind.SWA] * 2
    assert all(
        s.attn is (AttnKind.CSA if s.index % 2 == 0 else AttnKind.HCA) for s in cfg.layers[2:]
    )
    assert (
        len(cfg.layers_of(AttnKind.SWA)),
        len(cfg.layers_of(AttnKind.CSA)),
        len(cfg.layers_of(AttnKind.HCA)),
    ) == (
        2,
        21,
        20,
    )
    assert [s.hash_moe for s in cfg.layers[:4]] == [True, True, True, False]
    (mtp,) = cfg.mtp_layers
    assert mtp.is_mtp and mtp.attn is AttnKind.SWA and not mtp.hash_moe and mtp.rope.yarn is None
    assert (cfg.index_topk, cfg.o_groups, cfg.routed_scaling_factor, cfg.num_heads) == (
        512,
        8,
        1.5,
        64,
    )
    assert cfg.quant is not None and cfg.quant.expert_dtype == "fp4"
    assert cfg.block_size == 128 and cfg.nope_dim == 448


def test_pro_schedule_matches_release():
    cfg = DSV4Config.from_json(CONFIGS / "dsv4-pro.json")
    assert kinds(cfg)[:2] == [AttnKind.HCA] * 2
    assert all(
        s.attn is (AttnKind.CSA if s.index % 2 == 0 else AttnKind.HCA) for s in cfg.layers[2:]
    )
    assert (len(cfg.layers_of(AttnKind.CSA)), len(cfg.layers_of(AttnKind.HCA))) == (30, 31)
    assert (cfg.index_topk, cfg.o_groups, cfg.routed_scaling_factor, cfg.hidden_size) == (
        1024,
        16,
        2.5,
        7168,
    )
    assert cfg.mtp_layers[0].attn is AttnKind.SWA


def test_rope_per_layer_kind():
    cfg = DSV4Config.from_json(CONFIGS / "dsv4-flash.json")
    swa, csa, hca = cfg.layers[0], cfg.layers[2], cfg.layers[3]
    assert swa.rope.theta == 10000.0 and swa.rope.yarn is None
    for s in (csa, hca):
        assert s.rope.theta == 160000.0
        assert s.rope.yarn.factor == 16 and s.rope.yarn.original_max_position_embeddings == 65536
        assert (s.rope.yarn.beta_fast, s.rope.yarn.beta_slow) == (32, 1)


@pytest.mark.parametrize("name", ["dsv4-flash", "dsv4-pro", "tiny-6l"])
def test_hf_spelling_parses_to_same_schedule(name):
    """HF's config object folds the released keys into layer_types / mlp_layer_types /
    rope_parameters; parsing its to_dict() must give our schedule from the released keys."""
    from transformers import DeepseekV4Config

    released = load(name)
    hf = DeepseekV4Config(**released).to_dict()
    for legacy in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling"):
        hf.pop(legacy, None)
    assert "layer_types" in hf and "rope_parameters" in hf
    ours, theirs = DSV4Config.from_dict(released), DSV4Config.from_dict(hf)
    assert ours.layers == theirs.layers
    assert ours.mtp_layers == theirs.mtp_layers
    assert (ours.rope_dim, ours.index_topk, ours.hc_mult) == (
        theirs.rope_dim,
        theirs.index_topk,
        theirs.hc_mult,
    )
    # the keys SGLang reads, derived from the HF spelling, are the released file's
    fields = released_fields(theirs)
    assert fields == {k: released[k] for k in ("compress_ratios", "qk_rope_head_dim")}


def test_modern_hf_fields_without_legacy_keys():
    d = load("tiny-6l")
    for legacy in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling"):
        d.pop(legacy)
    d["layer_types"] = ["sliding_attention"] * 2 + [
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    ] * 2
    d["mlp_layer_types"] = ["hash_moe"] + ["moe"] * 5
    d["partial_rotary_factor"] = 0.5
    d["rope_parameters"] = {
        "rope_type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
    }
    cfg = DSV4Config.from_dict(d)
    assert DSV4Config.from_dict(load("tiny-6l")).layers == cfg.layers
    assert cfg.rope_dim == 64


def test_official_modelargs_aliases():
    d = load("tiny-6l")
    d["dim"] = d.pop("hidden_size")
    d["n_layers"] = d.pop("num_hidden_layers")
    d["n_heads"] = d.pop("num_attention_heads")
    d["route_scale"] = d.pop("routed_scaling_factor")
    cfg = DSV4Config.from_dict(d)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.routed_scaling_factor) == (
        256,
        6,
        4,
        1.5,
    )


BAD = [
    ({"compress_ratios": [0, 0, 4, 128, 4, 128]}, "compress_ratios", "7 entries"),
    ({"compress_ratios": [0, 0, 4, 64, 4, 128, 0]}, "compress_ratios", "[0, 4, 128]"),
    ({"o_groups": 3}, "o_groups", "divisor of num_attention_heads = 4"),
    ({"num_key_value_heads": 4}, "num_key_value_heads", "1"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim", "even number"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", "at most n_routed_experts = 8"),
    ({"scoring_func": "relu"}, "scoring_func", "sqrtsoftplus"),
    ({"num_hash_layers": 7}, "num_hash_layers", "at most num_hidden_layers = 6"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type", "yarn"),
    ({"hidden_size": 0}, "hidden_size", ">= 1"),
    ({"hidden_size": "256"}, "hidden_size", "integer"),
    ({"model_type": "deepseek_v3"}, "model_type", "deepseek_v4"),
    (
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
        "weight_block_size",
        "[128, 128]",
    ),
    (
        {"expert_dtype": "int4", "quantization_config": {"quant_method": "fp8"}},
        "expert_dtype",
        "fp4",
    ),
    ({"compress_ratios": None}, "compress_ratios", "schedule"),
]


@pytest.mark.parametrize(("change", "field", "expected"), BAD, ids=[b[1] for b in BAD])
def test_invalid_config_names_field_and_expected_value(change, field, expected):
    d = load("tiny-6l")
    d.update(change)
    with pytest.raises(ConfigError) as err:
        DSV4Config.from_dict(d)
    assert field in str(err.value) and expected in str(err.value), str(err.value)


def test_layer_types_length_checked():
    d = load("tiny-6l")
    del d["compress_ratios"]
    d["layer_types"] = ["sliding_attention"] * 5
    with pytest.raises(ConfigError, match=r"layer_types.*6 entries"):
        DSV4Config.from_dict(d)


def test_missing_required_field():
    d = load("tiny-6l")
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        DSV4Config.from_dict(d)
