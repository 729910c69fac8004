"""scripts/add_mtp_layer.py: a trained MTP layer joins a released checkpoint as one more shard,
only when the main tensors are bit-identical; the main shards keep their bytes."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from add_mtp_layer import read_tensors, release


def _checkpoint(path: Path, tensors: dict, shards: list[list[str]]) -> None:
    path.mkdir()
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, path / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text("{}")


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    main = {
        "embed.weight": torch.randn(8, 4, generator=g).bfloat16(),
        "layers.0.attn.attn_sink": torch.randn(2, generator=g),
        "head.weight": torch.randn(8, 4, generator=g).bfloat16(),
    }
    mtp = {"mtp.0.e_proj.weight": torch.randn(4, 4, generator=g).bfloat16()}
    _checkpoint(
        tmp_path / "released", main, [["embed.weight"], ["layers.0.attn.attn_sink", "head.weight"]]
    )
    _checkpoint(tmp_path / "trained", main | mtp, [list(main) + list(mtp)])
    return tmp_path / "trained", tmp_path / "released", main, mtp


def test_mtp_layer_joins_as_an_extra_shard(pair):
    trained, released, main, mtp = pair
    before = {f.name: f.read_bytes() for f in released.glob("*.safetensors")}
    assert release(trained, released) == {
        "main_tensors_identical": 3,
        "mtp_tensors": 1,
        "shards": 3,
    }
    files = sorted(f.name for f in released.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for i in (1, 2):  # the main shards keep their bytes, renamed
        new = released / f"model-0000{i}-of-00003.safetensors"
        assert new.read_bytes() == before[f"model-0000{i}-of-00002.safetensors"]
    index = json.loads((released / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["mtp.0.e_proj.weight"] == "model-00003-of-00003.safetensors"
    assert index["weight_map"]["head.weight"] == "model-00002-of-00003.safetensors"
    assert index["metadata"]["total_size"] == 8 * 4 * 2 * 2 + 2 * 4 + 4 * 4 * 2
    got = read_tensors(released)
    assert got.keys() == main.keys() | mtp.keys()
    assert all(torch.equal(got[k], v) for k, v in (main | mtp).items())
    release(trained, released)  # again: the older MTP shard is replaced, not duplicated
    assert len(list(released.glob("*.safetensors"))) == 3


def test_a_changed_main_tensor_is_refused(pair, tmp_path):
    _, released, main, mtp = pair
    changed = dict(main)
    changed["head.weight"] = changed["head.weight"].clone()
    changed["head.weight"][0, 0] = -changed["head.weight"][0, 0]
    _checkpoint(tmp_path / "changed", changed | mtp, [list(changed) + list(mtp)])
    with pytest.raises(SystemExit, match=r"head\.weight changed"):
        release(tmp_path / "changed", released)
    assert len(list(released.glob("*.safetensors"))) == 2  # nothing written
