"""Model names this package resolves without a download.

``dsv4`` is the embedded default: a small DSV4 trained on Shakespeare (``scripts/train_tiny.py``;
layers SWA, SWA, c4, c128, c4, c128; hash-routed and scored MoE; mHC; sinks; a 6K-token BPE
tokenizer with the DSV4 chat markers), shipped inside the package in
``sglang_dsv4/models/dsv4-tiny`` (config.json, sharded safetensors under the released tensor
names, tokenizer files). ``dsv4-flash`` / ``dsv4-pro`` name the public DeepSeek-V4 repos.

The embedded model was trained on :data:`EMBEDDED_CONTEXT`-token samples (its config keeps the
release's 1M ``max_position_embeddings``); the server uses that as its context length unless
``--context-length`` says otherwise.
"""

from pathlib import Path

__all__ = [
    "EMBEDDED",
    "EMBEDDED_CONTEXT",
    "PUBLIC",
    "embedded_checkpoint",
    "randomize_zero_inits",
    "resolve_model_name",
]

PUBLIC = {"dsv4-flash": "deepseek-ai/DeepSeek-V4-Flash", "dsv4-pro": "deepseek-ai/DeepSeek-V4-Pro"}
EMBEDDED = "dsv4"
EMBEDDED_CONTEXT = 4096  # scripts/train_tiny.py --seq-len of the shipped model
_EMBEDDED_DIR = Path(__file__).resolve().parent / "models" / "dsv4-tiny"


def resolve_model_name(name: str) -> str | None:
    """Local path or repo id for one of our names; ``None`` if ``name`` is not ours."""
    if name == EMBEDDED:
        return str(embedded_checkpoint())
    return PUBLIC.get(name)


def embedded_checkpoint() -> Path:
    """Directory of the trained tiny checkpoint shipped in the package."""
    if not (_EMBEDDED_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded DSV4 checkpoint is missing from {_EMBEDDED_DIR} "
            "(a package installed without its package data?)"
        )
    return _EMBEDDED_DIR


def randomize_zero_inits(model, seed: int) -> None:
    """HF initializes sinks, ape, mHC bases, router bias and tid2eid to zero: draw them (and
    perturb the norm weights) so that a random model exercises every parameter (the random
    test models of ``tests/hf_tiny.py``)."""
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
