"""Writing DSV4 checkpoints: the released format (quantized, sharded) from logical tensors.

:func:`project_to_released` rounds logical tensors onto what the released format can hold
(FP8 / MXFP4 quantize-dequantize, BF16 rounding), in place, so that a dense checkpoint of the
projected values and the released checkpoint describe the *same* model exactly.
:func:`write_released` packs logical tensors (:func:`~sglang_dsv4.weights.layout.pack`) and
writes them as ``model-0000i-of-0000n.safetensors`` shards of at most ``shard_bytes`` with a
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``), as the public
DeepSeek-V4 repos do.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from sglang_dsv4.progress import track
from sglang_dsv4.weights.layout import Fmt, StoredWeight, pack, released_fmt

__all__ = [
    "QUANTIZATION_CONFIG",
    "project_to_released",
    "released_config",
    "released_tensors",
    "write_released",
    "write_shards",
]

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "scale_fmt": "ue8m0",
}


def released_config(config: dict, expert_dtype: str = "fp4") -> dict:
    """config.json of the released format: the model's config plus ``quantization_config``,
    root ``expert_dtype`` and ``torch_dtype`` bfloat16, like the public repos."""
    out = dict(config)
    out["quantization_config"] = dict(QUANTIZATION_CONFIG)
    out["expert_dtype"] = expert_dtype
    out["torch_dtype"] = "bfloat16"
    return out


def project_to_released(tensors: Iterable[tuple[str, torch.Tensor]], expert_dtype: str) -> None:
    """Overwrite each logical tensor (released name, writable view) with the value its released
    storage represents; afterwards :func:`released_tensors` stores it without loss."""
    with torch.no_grad():
        for name, t in track(tensors, "rounding onto the released grid", "tensor"):
            fmt = released_fmt(name, expert_dtype)
            if fmt in (Fmt.FP32, Fmt.I64):
                continue
            data, scale = pack(t, fmt)
            t.copy_(StoredWeight(fmt, data, scale).dequant(t.dtype).to(t.dtype))


def released_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], expert_dtype: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors (``X.weight`` then ``X.scale`` for quantized ones) of logical tensors."""
    for name, t in tensors:
        data, scale = pack(t.detach(), released_fmt(name, expert_dtype))
        yield name, data
        if scale is not None:
            yield name.removesuffix(".weight") + ".scale", scale


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], out: Path, shard_bytes: int
) -> dict[str, str]:
    """Write ``tensors`` into consecutive shards of at most ``shard_bytes`` (a larger tensor gets
    a shard of its own) plus the index, holding one shard in memory at a time; returns the weight
    map (name -> file)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []  # (temporary file, names) per shard
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        tmp = out / f".shard-{len(written):05d}.tmp"
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard.clear()

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = t.contiguous()
        size += nbytes
        total += nbytes
    if shard or not written:
        flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        tmp.rename(out / file)
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def write_released(
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    out: Path,
    expert_dtype: str = "fp4",
    shard_bytes: int = 5 << 30,
) -> dict[str, str]:
    """Write logical tensors (released names, MTP included) as a released-format checkpoint."""
    tensors = track(tensors, f"writing {out.name}", "tensor")
    weight_map = write_shards(released_tensors(tensors, expert_dtype), out, shard_bytes)
    config_json = json.dumps(released_config(config, expert_dtype), indent=2)
    (out / "config.json").write_text(config_json + "\n")
    return weight_map
