"""Tensor names: one table from HF transformers' names to the released DeepSeek-V4 names.

The released names (``layers.{i}.attn.wq_a.weight``, ``layers.{i}.ffn.experts.{e}.w1.weight``,
``hc_head_fn`` ...) are canonical inside this package. HF transformers 5.12.1 saves its internal
names (``model.layers.{i}.self_attn.q_a_proj.weight``, stacked ``mlp.experts.gate_up_proj`` ...),
5.17 mostly released names under ``model.`` (``model.layers.{i}.attn.attn_sink``);
:func:`to_released_names` maps one such tensor to released names (splitting stacked experts into
views, so writing into them writes the HF tensor), :func:`hf_to_released` a whole state dict.
Quantized checkpoints only exist under released names (HF has no name for ``.scale``).
"""

import re
from collections.abc import Iterator

import torch

__all__ = ["HF_NAME_TABLE", "hf_to_released", "is_hf_name", "is_mtp_name", "to_released_names"]

# (HF pattern, released template); ``{0}``, ``{1}`` ... = the pattern's groups (``{0}`` = layer).
# Order does not matter: the patterns are anchored and disjoint (tests/weights/test_names.py).
# transformers 5.12.1 saves a mix: internal names, but ``head.weight`` and per-expert
# ``mlp.experts.{e}.w1.weight``; 5.17's spelling follows them.
HF_NAME_TABLE: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"(?:lm_)?head\.weight", "head.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"model\.hc_head\.hc_fn", "hc_head_fn"),
    (r"model\.hc_head\.hc_base", "hc_head_base"),
    (r"model\.hc_head\.hc_scale", "hc_head_scale"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.attn_hc\.(fn|base|scale)", "layers.{0}.hc_attn_{1}"),
    (r"model\.layers\.(\d+)\.ffn_hc\.(fn|base|scale)", "layers.{0}.hc_ffn_{1}"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", "layers.{0}.attn.wq_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_norm\.weight", "layers.{0}.attn.q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", "layers.{0}.attn.wq_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_proj\.weight", "layers.{0}.attn.wkv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_norm\.weight", "layers.{0}.attn.kv_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_a_proj\.weight", "layers.{0}.attn.wo_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_b_proj\.weight", "layers.{0}.attn.wo_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.sinks", "layers.{0}.attn.attn_sink"),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.kv_proj\.weight",
        "layers.{0}.attn.compressor.wkv.weight",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.gate_proj\.weight",
        "layers.{0}.attn.compressor.wgate.weight",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.position_bias",
        "layers.{0}.attn.compressor.ape",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.kv_norm\.weight",
        "layers.{0}.attn.compressor.norm.weight",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.kv_proj\.weight",
        "layers.{0}.attn.indexer.compressor.wkv.weight",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.gate_proj\.weight",
        "layers.{0}.attn.indexer.compressor.wgate.weight",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.position_bias",
        "layers.{0}.attn.indexer.compressor.ape",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.kv_norm\.weight",
        "layers.{0}.attn.indexer.compressor.norm.weight",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.q_b_proj\.weight",
        "layers.{0}.attn.indexer.wq_b.weight",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.weight",
        "layers.{0}.attn.indexer.weights_proj.weight",
    ),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", "layers.{0}.ffn.gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", "layers.{0}.ffn.gate.bias"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.tid2eid", "layers.{0}.ffn.gate.tid2eid"),
    (
        r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.weight",
        "layers.{0}.ffn.shared_experts.w1.weight",
    ),
    (
        r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj\.weight",
        "layers.{0}.ffn.shared_experts.w2.weight",
    ),
    (
        r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj\.weight",
        "layers.{0}.ffn.shared_experts.w3.weight",
    ),
    (
        r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w[123])\.weight",
        "layers.{0}.ffn.experts.{1}.{2}.weight",
    ),
    # stacked experts (in-memory state dict): split into per-expert w1 / w3 (gate_up = [w1; w3])
    (
        r"model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj",
        "layers.{0}.ffn.experts.{e}.w1|w3.weight",
    ),
    (r"model\.layers\.(\d+)\.mlp\.experts\.down_proj", "layers.{0}.ffn.experts.{e}.w2.weight"),
    # transformers 5.17 saves through the reverse of its load-time renames (conversion_mapping.py,
    # "deepseek_v4"): a layer's released names under ``model.``, except that reversing
    # ``.norm.`` -> ``.kv_norm.`` turns the attention's ``kv_norm`` into ``attn.norm``. Top-level
    # tensors keep the names above (its reverse renames are anchored at ``^`` and miss ``model.``).
    (
        r"model\.layers\.(\d+)\.((?:attn|ffn)_norm\.weight|hc_(?:attn|ffn)_(?:fn|base|scale))",
        "layers.{0}.{1}",
    ),
    (
        r"model\.layers\.(\d+)\.(attn\.(?:(?:wq_a|wq_b|wkv|wo_a|wo_b|q_norm|kv_norm)\.weight|attn_sink))",
        "layers.{0}.{1}",
    ),
    (r"model\.layers\.(\d+)\.attn\.norm\.weight", "layers.{0}.attn.kv_norm.weight"),
    (
        r"model\.layers\.(\d+)\.(attn\.(?:indexer\.)?compressor\.(?:(?:wkv|wgate|norm)\.weight|ape))",
        "layers.{0}.{1}",
    ),
    (r"model\.layers\.(\d+)\.(attn\.indexer\.(?:wq_b|weights_proj)\.weight)", "layers.{0}.{1}"),
    (r"model\.layers\.(\d+)\.(ffn\.gate\.(?:weight|bias|tid2eid))", "layers.{0}.{1}"),
    (
        r"model\.layers\.(\d+)\.(ffn\.(?:shared_experts|experts\.\d+)\.w[123]\.weight)",
        "layers.{0}.{1}",
    ),
)
_COMPILED = tuple((re.compile(p + r"\Z"), t) for p, t in HF_NAME_TABLE)


def _map_one(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for pattern, template in _COMPILED:
        m = pattern.match(name)
        if m is None:
            continue
        base = template.replace("{e}", "\0").format(*m.groups()).replace("\0", "{e}")
        if "{e}" not in base:
            yield base, tensor
        elif "w1|w3" in base:  # gate_up_proj [E, 2I, d]
            w1, w3 = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                yield base.replace("{e}", str(e)).replace("w1|w3", "w1"), w1[e]
                yield base.replace("{e}", str(e)).replace("w1|w3", "w3"), w3[e]
        else:
            for e in range(tensor.shape[0]):
                yield base.replace("{e}", str(e)), tensor[e]
        return
    raise KeyError(f"tensor `{name}` has no entry in the HF -> DeepSeek name table")


def is_hf_name(name: str) -> bool:
    return name.startswith("model.") or name == "lm_head.weight"


def is_mtp_name(name: str) -> bool:
    """Tensors of the MTP (speculative) layers: released ``mtp.{i}.*``, HF-style ``model.mtp.*``."""
    return name.startswith(("mtp.", "model.mtp."))


def to_released_names(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Released (name, tensor) pairs of one checkpoint tensor: HF names are mapped (stacked
    experts split into views), other names are taken as released names already."""
    if is_hf_name(name):
        yield from _map_one(name, tensor)
    else:
        yield name, tensor


def hf_to_released(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF-transformers DeepseekV4ForCausalLM state dict to released names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        for new_name, t in _map_one(name, tensor):
            out[new_name] = t.contiguous()
    return out
