"""The HF -> released name table against the names each transformers version saves.

``data/hf_5_17_tiny6l.json`` was recorded (2026-12-06) from transformers 5.17.0's
``save_pretrained`` of ``build_hf_model(configs/tiny-6l.json, seed=0)``: every saved tensor's name,
shape, sum and position-weighted sum. The same seed gives the same weights under the venv's
transformers, so each 5.17 tensor's fingerprint must equal that of the tensor our table maps it to
(the mapping of the in-memory names being the trusted one).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.weights.layout import logical_shapes
from sglang_dsv4.weights.loader import UnexpectedTensorError, WeightStream, load_state_dict
from sglang_dsv4.weights.make import build_hf_model
from sglang_dsv4.weights.names import HF_NAME_TABLE, hf_to_released, to_released_names

ROOT = Path(__file__).resolve().parents[2]
SAVED_517 = json.loads((Path(__file__).parent / "data" / "hf_5_17_tiny6l.json").read_text())


def fingerprint(t: torch.Tensor) -> tuple[float, float]:
    flat = t.detach().double().flatten()  # [n]
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)  # [n]
    return float(flat.sum()), float((flat * weights).sum())


@pytest.fixture(scope="module")
def tiny6l():
    config = json.loads((ROOT / "configs" / "tiny-6l.json").read_text())
    model = build_hf_model(config, seed=0)
    return DSV4Config.from_dict(config), hf_to_released(model.state_dict())


def test_every_5_17_tensor_lands_on_its_released_name(tiny6l):
    cfg, released = tiny6l
    mapped = {}
    for name, (shape, total, weighted) in SAVED_517.items():
        pairs = list(to_released_names(name, torch.zeros(shape)))
        assert len(pairs) == 1, name
        target, _ = pairs[0]
        assert target not in mapped, f"{name} and {mapped.get(target)} both map to {target}"
        mapped[target] = name
        assert list(released[target].shape) == shape, name
        assert fingerprint(released[target]) == pytest.approx((total, weighted), rel=1e-9), name
    wanted = {n for n in logical_shapes(cfg) if not n.startswith("mtp.")}
    assert set(mapped) == wanted
    # the renaming that 5.12.1 lacks: kv_norm saved as attn.norm, sinks as attn_sink
    assert mapped["layers.0.attn.kv_norm.weight"] == "model.layers.0.attn.norm.weight"
    assert mapped["layers.3.attn.attn_sink"] == "model.layers.3.attn.attn_sink"


def test_table_patterns_are_disjoint(tiny_checkpoint):
    """Each name either version saves matches exactly one pattern (so order cannot matter)."""
    from sglang_dsv4.weights.loader import iter_safetensors

    installed = [name for name, _ in iter_safetensors(tiny_checkpoint)]
    compiled = [re.compile(p + r"\Z") for p, _ in HF_NAME_TABLE]
    for name in [*SAVED_517, *installed]:
        hits = [p.pattern for p in compiled if p.match(name)]
        assert len(hits) == 1, (name, hits)


def test_a_5_17_checkpoint_loads(tiny6l, tmp_path):
    cfg, released = tiny6l
    saved = {}
    for name, (shape, _, _) in SAVED_517.items():
        ((target, _),) = to_released_names(name, torch.zeros(shape))
        saved[name] = released[target].contiguous()
    save_file(saved, tmp_path / "model.safetensors")
    loaded = load_state_dict(tmp_path)
    assert len(saved) == len(released) and set(loaded) == set(released)
    for name, want in released.items():
        assert torch.equal(loaded[name], want), name
    streamed = {}
    WeightStream(cfg, lambda n, s: streamed.__setitem__(n, s.dequant(torch.float32))).run(
        iter(saved.items())
    )
    assert set(streamed) == set(released)
    for name, want in released.items():
        assert torch.equal(streamed[name].float(), want), name


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.attn.mystery",
        "model.layers.0.attn.compressor.wq_b.weight",  # a real suffix in the wrong module
        "model.layers.0.ffn.experts.w1.weight",  # no expert index
        "model.mtp_head.weight",
    ],
)
def test_unknown_5_17_style_names_still_raise(tiny6l, name):
    cfg, _ = tiny6l
    with pytest.raises(KeyError, match=re.escape(name)):
        hf_to_released({name: torch.zeros(1)})
    with pytest.raises(UnexpectedTensorError, match=re.escape(name)):
        WeightStream(cfg, lambda n, s: None).run(iter([(name, torch.zeros(1))]))
