import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from served_model import served_tensors

from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.weights.layout import logical_shapes
from sglang_dsv4.weights.loader import (
    MissingTensorError,
    TensorMismatchError,
    UnexpectedTensorError,
    WeightStream,
    checkpoint_files,
    iter_safetensors,
    load_state_dict,
)
from sglang_dsv4.weights.names import hf_to_released
from sglang_dsv4.weights.writer import released_config, released_tensors


def released_cfg(tiny_dict, expert_dtype="fp4"):
    from sglang_dsv4.config import DSV4Config

    return DSV4Config.from_dict(released_config(tiny_dict, expert_dtype))


def collect(cfg, weights) -> dict[str, torch.Tensor]:
    out = {}
    WeightStream(cfg, lambda n, s: out.__setitem__(n, s.dequant(torch.float32).float())).run(
        weights
    )
    return out


@pytest.fixture(scope="module")
def projected(tiny_ckpt_pair):
    """The logical fp32 weights both checkpoints hold (released names)."""
    return hf_to_released(tiny_ckpt_pair[2].state_dict())


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_pair):
    """(HF-format, released-format) checkpoints read back as dense fp32 state dicts."""
    hf_dir, rel_dir, _ = tiny_ckpt_pair
    return load_state_dict(hf_dir), load_state_dict(rel_dir, torch.float32)


def test_both_formats_load_to_the_same_weights(loaded, projected):
    from_hf, from_rel = loaded
    assert set(from_hf) == set(from_rel) == set(projected)
    for name, want in projected.items():
        assert torch.equal(from_hf[name], want), name
        assert torch.equal(from_rel[name], want), name


def test_both_formats_give_the_same_logits(loaded, tiny_cfg):
    ids = torch.randint(2, 1024, (160,), generator=torch.Generator().manual_seed(5))
    a, b = (RefDSV4(tiny_cfg, weights)(ids) for weights in loaded)
    # the weights are bit-identical (test above); CPU fp32 matmuls still pick their reduction
    # order by memory alignment, so a mere copy of the same weights moves logits by ~1e-6
    assert a.abs().max() > 1.0 and (a - b).abs().max() <= 1e-5


def test_released_files_are_as_released(tiny_ckpt_pair, tiny_cfg):
    _, rel_dir, _ = tiny_ckpt_pair
    config = json.loads((rel_dir / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    }
    assert config["expert_dtype"] == "fp4"
    index = json.loads((rel_dir / "model.safetensors.index.json").read_text())
    files = checkpoint_files(rel_dir)
    assert len(files) >= 5 and {rel_dir / f for f in index["weight_map"].values()} == set(files)
    dtypes = {name: str(t.dtype) for name, t in iter_safetensors(rel_dir)}
    assert set(dtypes) == set(index["weight_map"])
    sizes = sum(f.stat().st_size for f in files)
    assert index["metadata"]["total_size"] < sizes  # data bytes, without the headers
    want = {
        "layers.2.attn.wq_a.weight": "torch.float8_e4m3fn",
        "layers.2.attn.wq_a.scale": "torch.float8_e8m0fnu",
        "layers.2.attn.wo_a.weight": "torch.float8_e4m3fn",
        "layers.2.ffn.experts.3.w2.weight": "torch.int8",
        "layers.2.ffn.experts.3.w2.scale": "torch.float8_e8m0fnu",
        "layers.2.attn.compressor.wkv.weight": "torch.bfloat16",
        "layers.2.attn.indexer.weights_proj.weight": "torch.bfloat16",
        "layers.2.attn.attn_sink": "torch.float32",
        "layers.2.ffn.gate.bias": "torch.float32",
        "layers.0.ffn.gate.tid2eid": "torch.int64",
        "mtp.0.h_proj.scale": "torch.float8_e8m0fnu",
        "head.weight": "torch.bfloat16",
    }
    assert {n: dtypes[n] for n in want} == want
    n_mtp = sum(n.startswith("mtp.0.") for n in dtypes)
    assert n_mtp > 50 and len(dtypes) - n_mtp > len(logical_shapes(tiny_cfg, mtp=False))


def test_fp8_experts_variant(tiny_dict, projected):
    cfg = released_cfg(tiny_dict, "fp8")
    stream = released_tensors(projected.items(), "fp8")
    got = collect(cfg, stream)
    assert all(torch.equal(got[n], projected[n].float()) for n in projected)


def test_served_model_loads_the_released_checkpoint(tiny_ckpt_pair, projected, monkeypatch):
    from transformers import AutoConfig

    import sglang_dsv4.model.deepseek_v4 as served

    _, rel_dir, _ = tiny_ckpt_pair
    monkeypatch.setattr(served, "LogitsProcessor", lambda config: None)  # needs a server
    model = served.DeepseekV4ForCausalLM(AutoConfig.from_pretrained(rel_dir))
    model.load_weights(iter_safetensors(rel_dir))
    params = served_tensors(model)
    assert all(torch.equal(params[n], projected[n]) for n in projected)


# --- corrupted checkpoints -----------------------------------------------------------------


@pytest.fixture(scope="module")
def released_stream(tiny_ckpt_pair):
    """The released checkpoint's tensors in file order (a list, so tests can edit it)."""
    return list(iter_safetensors(tiny_ckpt_pair[1]))


def edited(stream, name, tensor=None, drop=False):
    out = [(n, t) for n, t in stream if not (drop and n == name)]
    if tensor is not None:
        out = [(n, tensor if n == name else t) for n, t in out]
    return out


def test_missing_tensor_is_named(tiny_dict, released_stream):
    cfg = released_cfg(tiny_dict)
    with pytest.raises(MissingTensorError, match=r"`layers\.3\.attn\.wo_b\.scale` \(\(2, 1\)"):
        collect(cfg, edited(released_stream, "layers.3.attn.wo_b.scale", drop=True))
    with pytest.raises(MissingTensorError, match=r"`layers\.4\.ffn\.gate\.bias` \(\(8,\)"):
        collect(cfg, edited(released_stream, "layers.4.ffn.gate.bias", drop=True))


def test_wrong_shape_is_named(tiny_dict, released_stream):
    cfg = released_cfg(tiny_dict)
    bad = torch.zeros(64, 255, dtype=torch.float8_e4m3fn)
    msg = (
        r"tensor `layers\.2\.attn\.wq_a\.weight`: expected \(64, 256\) torch\.float8_e4m3fn"
        r" \(released format, fp8\), found \(64, 255\) torch\.float8_e4m3fn"
    )
    with pytest.raises(TensorMismatchError, match=msg):
        collect(cfg, edited(released_stream, "layers.2.attn.wq_a.weight", bad))


def test_wrong_dtype_is_named(tiny_dict, released_stream):
    cfg = released_cfg(tiny_dict)
    bad = torch.zeros(128, 128, dtype=torch.uint8)
    msg = (
        r"tensor `layers\.5\.ffn\.experts\.1\.w3\.weight`: expected \(128, 128\) torch\.int8"
        r" \(released format, mxfp4\), found \(128, 128\) torch\.uint8"
    )
    with pytest.raises(TensorMismatchError, match=msg):
        collect(cfg, edited(released_stream, "layers.5.ffn.experts.1.w3.weight", bad))
    bf16_scale = torch.ones(1, 2, dtype=torch.bfloat16)
    with pytest.raises(TensorMismatchError, match=r"wq_a\.scale`: expected \(1, 2\) torch\.float8"):
        collect(cfg, edited(released_stream, "layers.2.attn.wq_a.scale", bf16_scale))


def test_unexpected_and_duplicate_tensors_are_named(tiny_dict, tiny_cfg, released_stream):
    cfg = released_cfg(tiny_dict)
    extra = [*released_stream, ("layers.2.attn.mystery", torch.zeros(1))]
    with pytest.raises(UnexpectedTensorError, match=r"`layers\.2\.attn\.mystery`"):
        collect(cfg, extra)
    dup = [*released_stream, released_stream[3]]
    with pytest.raises(UnexpectedTensorError, match="appears twice"):
        collect(cfg, dup)
    # quantized tensors under a config without quantization_config
    with pytest.raises(UnexpectedTensorError, match="no quantization_config"):
        collect(tiny_cfg, [(n, t) for n, t in released_stream if n.endswith(".scale")])
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.0\.self_attn\.mystery"):
        collect(tiny_cfg, [("model.layers.0.self_attn.mystery", torch.zeros(1))])


def test_dense_checkpoint_errors(tiny_cfg, tiny_ckpt_pair):
    stream = list(iter_safetensors(tiny_ckpt_pair[0]))
    name = "model.layers.1.self_attn.sinks"
    with pytest.raises(TensorMismatchError, match=r"model\.layers\.1\.self_attn\.sinks` \(as "):
        collect(tiny_cfg, edited(stream, name, torch.zeros(4, dtype=torch.int32)))
    with pytest.raises(MissingTensorError, match=r"`layers\.1\.attn\.attn_sink` \(\(4,\) floating"):
        collect(tiny_cfg, edited(stream, name, drop=True))


# --- streaming ------------------------------------------------------------------------------

_PEAK_SCRIPT = """
import json, sys, torch
from sglang_dsv4.config import DSV4Config
from sglang_dsv4.weights.layout import logical_shapes
from sglang_dsv4.weights.loader import WeightStream, iter_safetensors

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
ckpt = sys.argv[1]
cfg = DSV4Config.from_json(ckpt)
params = {n: torch.zeros(s) for n, s in logical_shapes(cfg, mtp=False).items()}
deliver = lambda n, s: params[n].copy_(s.dequant(torch.float32) if s.fmt.quantized else s.data)
WeightStream(cfg, deliver).run(iter_safetensors(ckpt))  # warm-up: imports, allocator pools
before = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
WeightStream(cfg, deliver).run(iter_safetensors(ckpt))
print(json.dumps({"peak_growth": rss("VmHWM") - before}))
"""


def test_peak_host_memory_is_about_one_shard(tiny_dict, tmp_path):
    """Loading a released checkpoint of 16-expert layers (~11 MiB in 1 MiB shards) into
    preallocated parameters grows the process's peak RSS by about one shard (the open shard's
    file pages, plus the tensor in flight and its dequantization temporaries), not the model."""
    from sglang_dsv4.config import DSV4Config
    from sglang_dsv4.weights.writer import write_released

    torch.set_num_threads(1)  # many small quantizations: faster on one thread
    config = dict(tiny_dict, n_routed_experts=16)
    cfg = DSV4Config.from_dict(config)
    g = torch.Generator().manual_seed(0)
    logical = {n: torch.randn(s, generator=g) for n, s in logical_shapes(cfg).items()}
    logical = {n: t.abs().long() if n.endswith("tid2eid") else t for n, t in logical.items()}
    write_released(logical.items(), config, tmp_path, shard_bytes=1 << 20)
    files = checkpoint_files(tmp_path)
    shard = max(f.stat().st_size for f in files)
    total = sum(f.stat().st_size for f in files)
    # glibc returns freed blocks at once, so the peak counts what is live, not arena slack
    malloc = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, **malloc, "MALLOC_TRIM_THRESHOLD_": "0"},
    )
    growth = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    print(
        f"peak RSS growth {growth / 2**20:.2f} MiB; largest shard {shard / 2**20:.2f} MiB, "
        f"checkpoint {total / 2**20:.2f} MiB in {len(files)} shards"
    )
    assert len(files) >= 10  # the measurement means something: many shards
    # one shard plus a constant (the tensor in flight and its dequantization temporaries)
    assert growth < shard + (1 << 20) and growth < total / 4, (growth, shard, total)
