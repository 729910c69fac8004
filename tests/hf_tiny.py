"""The tiny HF transformers DSV4 oracle (fp32, CPU), as in ../shared/oracle/hf_tiny_dsv4.py.

HF initializes sinks, ape, mHC bases, router bias and tid2eid to zero; they are randomized here
(and the norm weights perturbed) so that the parity tests exercise them.
"""

import json
from pathlib import Path

import torch

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
    randomize(model, seed + 1)
    return model


@torch.no_grad()
def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    counts = {"bias-like": 0, "norm": 0, "router-bias": 0, "tid2eid": 0}
    for name, p in model.named_parameters():
        if name.endswith(("sinks", "position_bias", ".base", "hc_base")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            counts["bias-like"] += 1
        elif name.endswith(
            ("kv_norm.weight", "q_a_norm.weight", "layernorm.weight", "model.norm.weight")
        ):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            counts["norm"] += 1
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            counts["router-bias"] += 1
        elif name.endswith("tid2eid"):
            vocab, k = b.shape
            b.copy_(
                torch.stack(
                    [torch.randperm(cfg.n_routed_experts, generator=g)[:k] for _ in range(vocab)]
                )
            )
            counts["tid2eid"] += 1
    # a renamed parameter in another transformers release would silently weaken the tests
    assert all(counts.values()), f"parameter names changed; randomized {counts}"
