"""The tiny HF transformers DSV4 oracle (fp32, CPU), as in ../shared/oracle/hf_tiny_dsv4.py.

HF initializes sinks, ape, mHC bases, router bias and tid2eid to zero; ``randomize_zero_inits``
(shared with the embedded default model) draws them so that the parity tests exercise them.
"""

import json
from pathlib import Path

import torch

from sglang_dsv4.embedded import randomize_zero_inits

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config_dict(name: str = "tiny-6l", **overrides) -> dict:
    with open(CONFIGS / f"{name}.json") as f:
        d = json.load(f)
    d.update(overrides)
    return d


def build_hf_model(config: dict, seed: int = 0):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = DeepseekV4Config(**config)
    model = DeepseekV4ForCausalLM(hf_cfg).eval()
    randomize_zero_inits(model, seed + 1)
    return model
