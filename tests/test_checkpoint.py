import pytest
import torch

from sglang_dsv4.checkpoint import hf_to_released, iter_safetensors, load_state_dict
from sglang_dsv4.ref.model import RefDSV4


def test_hf_names_map_to_exactly_the_required_released_names(hf_model, tiny_cfg):
    released = hf_to_released(hf_model.state_dict())
    needed = set(RefDSV4.required_names(type("R", (), {"cfg": tiny_cfg})()))
    assert set(released) == needed


def test_experts_split_in_w1_w3_order(hf_model):
    released = hf_to_released(hf_model.state_dict())
    gate_up = hf_model.model.layers[2].mlp.experts.gate_up_proj
    inter = gate_up.shape[1] // 2
    assert torch.equal(released["layers.2.ffn.experts.5.w1.weight"], gate_up[5, :inter])
    assert torch.equal(released["layers.2.ffn.experts.5.w3.weight"], gate_up[5, inter:])
    assert torch.equal(
        released["layers.2.ffn.experts.5.w2.weight"],
        hf_model.model.layers[2].mlp.experts.down_proj[5],
    )


def test_unknown_tensor_is_named():
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.mystery"):
        hf_to_released({"model.layers.0.self_attn.mystery": torch.zeros(1)})


def test_load_from_sharded_dir(tmp_path):
    from safetensors.torch import save_file

    save_file({"embed.weight": torch.ones(2, 2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"head.weight": torch.zeros(2, 2)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"embed.weight": "model-00001-of-00002.safetensors",'
        ' "head.weight": "model-00002-of-00002.safetensors"}}'
    )
    assert [n for n, _ in iter_safetensors(tmp_path)] == ["embed.weight", "head.weight"]
    assert set(load_state_dict(tmp_path)) == {"embed.weight", "head.weight"}
    with pytest.raises(FileNotFoundError):
        list(iter_safetensors(tmp_path / "nothing-here"))
