"""NVFP4 quantize-on-load: routed experts (and optionally the other linears) re-stored as NVFP4.

Switched on in config.json (SGLang's ``--quantization nvfp4_online`` is Blackwell-only and
``--model-loader-extra-config`` rejects unknown keys, so the switch lives with the model):

* ``"nvfp4_on_load": "experts"``: every routed expert ``w1 / w2 / w3``;
* ``"nvfp4_on_load": "linears"``: also every linear the released format stores as FP8 (attention
  ``wq_a wq_b wkv wo_b``, ``indexer.wq_b``, shared experts); ``wo_a`` stays as the reference
  runs it (BF16 from FP8), compressor / router / head stay BF16.

Sources may be dense (BF16 / fp32), FP8 or MXFP4. MXFP4 converts exactly (same codes, scales
re-expressed, :func:`~sglang_dsv4.ref.weight_quant.nvfp4_from_mxfp4`); the others are quantized
from their dequantized values (:func:`~sglang_dsv4.ref.weight_quant.nvfp4_quant`, per-tensor
global scale). On CPU the model then runs the dequantized NVFP4 values.
"""

import re
from collections.abc import Callable

import torch

from sglang_dsv4.ref.weight_quant import nvfp4_from_mxfp4, nvfp4_quant
from sglang_dsv4.weights.layout import Fmt, StoredWeight

__all__ = ["CONFIG_KEY", "nvfp4_scope", "to_nvfp4"]

CONFIG_KEY = "nvfp4_on_load"
_EXPERTS = r".*\.ffn\.experts\.\d+\.w[123]\.weight"
_LINEARS = (
    r".*\.attn\.(wq_a|wq_b|wkv|wo_b)\.weight",
    r".*\.attn\.indexer\.wq_b\.weight",
    r".*\.ffn\.shared_experts\.w[123]\.weight",
)
_SCOPES = {"experts": (_EXPERTS,), "linears": (_EXPERTS, *_LINEARS)}


def nvfp4_scope(value: str | None) -> Callable[[str], bool] | None:
    """Which logical tensors (released names) to re-store as NVFP4; None when switched off."""
    if value is None:
        return None
    if value not in _SCOPES:
        raise ValueError(
            f"config field `{CONFIG_KEY}`: expected one of {sorted(_SCOPES)}, got {value!r}"
        )
    pattern = re.compile("|".join(_SCOPES[value]) + r"\Z")
    return lambda name: pattern.match(name) is not None


def to_nvfp4(stored: StoredWeight) -> StoredWeight:
    """The same logical tensor as NVFP4 (exact from MXFP4, quantized from anything else)."""
    if stored.fmt is Fmt.NVFP4:
        return stored
    if stored.fmt is Fmt.MXFP4:
        data, scale, gs = nvfp4_from_mxfp4(stored.data, stored.scale)
    else:
        data, scale, gs = nvfp4_quant(stored.dequant(torch.float32).float())
    return StoredWeight(Fmt.NVFP4, data, scale, gs)
