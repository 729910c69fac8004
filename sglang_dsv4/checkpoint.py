"""Reading checkpoints: the public entry points (the implementation is :mod:`sglang_dsv4.weights`).

``hf_to_released`` / ``to_released_names`` map HF transformers' tensor names to the released
DeepSeek-V4 names (one table, :mod:`sglang_dsv4.weights.names`); ``iter_safetensors`` streams a
checkpoint shard by shard; ``load_state_dict`` returns its dense tensors under released names
(quantized released-format weights dequantized, everything checked against config.json).
"""

from sglang_dsv4.weights.loader import iter_safetensors, load_state_dict
from sglang_dsv4.weights.names import HF_NAME_TABLE, hf_to_released, to_released_names

__all__ = [
    "HF_NAME_TABLE",
    "hf_to_released",
    "iter_safetensors",
    "load_state_dict",
    "to_released_names",
]
