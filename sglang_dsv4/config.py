"""DeepSeek-V4 configuration and the frozen per-layer schedule.

Vocabulary used across the package (defined here once):

``swa_window``
    the raw KV of the last ``sliding_window`` (128) tokens; every layer attends to it.
``c4`` / CSA
    compressed sparse attention: a ratio-4 compressor with overlapping windows (two channel
    halves, the "a" half of window i-1 and the "b" half of window i pool into entry i) plus a
    lightning indexer that picks ``index_topk`` entries per query.
``c128`` / HCA
    heavily compressed attention: a ratio-128 compressor without overlap; every causally complete
    entry is attended.
``entries``
    the compressed KV vectors a compressor emits, one per ``ratio`` tokens; entry ``i`` covers
    tokens ``[i*ratio, (i+1)*ratio)`` and is visible to the query at ``t`` iff ``i < (t+1)//ratio``.
``tail``
    compressor state: the projected kv and scores of tokens not yet pooled into an entry (plus,
    for c4, the previous window's "a" half).
``block``
    128 original tokens = lcm(4, 128): the unit of prefix caching and pool accounting.

Two spellings of ``config.json`` are accepted: the released DeepSeek one (``compress_ratios``,
``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``; official ModelArgs aliases such as
``dim`` / ``n_layers`` too) and HF transformers' (``layer_types``, ``mlp_layer_types``,
``rope_parameters``, ``partial_rotary_factor``). Both parse to one :class:`DSV4Config` whose
``layers`` tuple is the schedule every other module reads; nothing re-derives it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AttnKind",
    "ConfigError",
    "DSV4Config",
    "LayerSpec",
    "QuantConfig",
    "RopeSpec",
    "YarnSpec",
    "load_config",
    "released_fields",
]


class ConfigError(ValueError):
    """A config.json field is missing or holds a value DSV4 cannot run with."""

    def __init__(self, field: str, expected: str, got: Any):
        self.field = field
        super().__init__(f"config field `{field}`: expected {expected}, got {got!r}")


class AttnKind(enum.Enum):
    SWA = 0  # sliding window only
    CSA = 4  # c4: overlapping ratio-4 compressor + indexer top-k
    HCA = 128  # c128: ratio-128 compressor, dense over entries

    @property
    def ratio(self) -> int:
        return self.value

    @property
    def compressed(self) -> bool:
        return self is not AttnKind.SWA


_HF_LAYER_TYPES = {
    "sliding_attention": AttnKind.SWA,
    "compressed_sparse_attention": AttnKind.CSA,
    "heavily_compressed_attention": AttnKind.HCA,
}
_HF_MLP_TYPES = {"hash_moe": True, "moe": False}
_RATIOS = {k.ratio: k for k in AttnKind}

# Official ``inference/ModelArgs`` names -> config.json names.
_ALIASES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "moe_inter_dim": "moe_intermediate_size",
    "n_hash_layers": "num_hash_layers",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "norm_eps": "rms_norm_eps",
    "n_mtp_layers": "num_nextn_predict_layers",
}


@dataclass(frozen=True)
class YarnSpec:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class RopeSpec:
    """RoPE of one layer: SWA layers use ``rope_theta`` plain; c4/c128 layers use
    ``compress_rope_theta`` with YaRN (and no attention mscale)."""

    theta: float
    yarn: YarnSpec | None


@dataclass(frozen=True)
class LayerSpec:
    index: int
    attn: AttnKind
    hash_moe: bool  # expert choice from tid2eid[token] instead of scores + bias
    rope: RopeSpec
    is_mtp: bool = False

    @property
    def ratio(self) -> int:
        return self.attn.ratio


@dataclass(frozen=True)
class QuantConfig:
    """Released checkpoint format: FP8 e4m3 linears with 128x128 UE8M0 block scales; routed
    experts in ``expert_dtype`` (fp4 = MXFP4, fp8 = like the other linears)."""

    weight_block: tuple[int, int] = (128, 128)
    scale_fmt: str = "ue8m0"
    expert_dtype: str = "fp4"


@dataclass(frozen=True)
class DSV4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    n_routed_experts: int
    n_experts_per_tok: int
    n_shared_experts: int
    moe_inter_dim: int
    scoring_func: str
    routed_scaling_factor: float
    swiglu_limit: float
    norm_eps: float
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    tie_word_embeddings: bool
    quant: QuantConfig | None
    layers: tuple[LayerSpec, ...]  # main layers
    mtp_layers: tuple[LayerSpec, ...]  # speculative (MTP) layers, SWA-only by release

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def hc_mix_dim(self) -> int:
        """Rows of an mHC ``fn``: pre (hc) + post (hc) + comb (hc*hc)."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def block_size(self) -> int:
        """Tokens per cache block: lcm of the compress ratios in use and the window."""
        ratios = [s.ratio for s in self.layers if s.attn.compressed]
        return math.lcm(self.sliding_window, *ratios) if ratios else self.sliding_window

    def layers_of(self, kind: AttnKind) -> tuple[LayerSpec, ...]:
        return tuple(s for s in self.layers if s.attn is kind)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DSV4Config:
        return _parse(raw)

    @classmethod
    def from_json(cls, path: str | Path) -> DSV4Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as f:
            return _parse(json.load(f))

    def replace(self, **changes: Any) -> DSV4Config:
        return dataclasses.replace(self, **changes)


def load_config(path: str | Path) -> DSV4Config:
    return DSV4Config.from_json(path)


def released_fields(cfg: DSV4Config) -> dict[str, Any]:
    """The released-spelling keys that SGLang itself reads from a DSV4 config object
    (``ModelConfig._derive_model_shapes``: ``compress_ratios``, ``qk_rope_head_dim``), derived
    from the parsed schedule so that a config saved by HF transformers (``layer_types`` +
    ``compress_rates``) reaches SGLang with the same schedule as ours."""
    return {
        "compress_ratios": [s.ratio for s in cfg.layers + cfg.mtp_layers],
        "qk_rope_head_dim": cfg.rope_dim,
    }


# --------------------------------------------------------------------------------------------
# parsing


class _Fields:
    """Reads fields of a raw dict, recording which were consumed; errors name the field."""

    def __init__(self, raw: dict[str, Any]):
        self.raw = {_ALIASES.get(k, k): v for k, v in raw.items()}

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        v = self.raw.get(key)
        return default if v is None else v

    def integer(self, key: str, default: int | None = None, *, min_value: int = 1) -> int:
        v = self.get(key, default)
        if v is None:
            raise ConfigError(key, "an integer (required field)", None)
        if isinstance(v, bool) or not isinstance(v, int) or v < min_value:
            raise ConfigError(key, f"an integer >= {min_value}", v)
        return v

    def number(self, key: str, default: float | None = None, *, positive: bool = True) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(key, "a number", v)
        if positive and not v > 0:
            raise ConfigError(key, "a number > 0", v)
        return float(v)


def _parse_yarn(d: dict[str, Any] | None, field: str) -> YarnSpec | None:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"{field}.type", '"yarn" (the only RoPE scaling DSV4 uses)', kind)
    for key in ("factor", "original_max_position_embeddings"):
        if d.get(key) is None:
            raise ConfigError(f"{field}.{key}", "a number", None)
    if d.get("mscale") or d.get("attention_factor") not in (None, 1, 1.0):
        # DSV4 applies YaRN frequencies without the attention temperature (mscale).
        raise ConfigError(f"{field}.attention_factor", "1.0 (no YaRN mscale in DSV4)", d)
    return YarnSpec(
        factor=float(d["factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]),
        beta_fast=float(d.get("beta_fast") or 32),
        beta_slow=float(d.get("beta_slow") or 1),
    )


def _rope_specs(f: _Fields) -> tuple[RopeSpec, RopeSpec]:
    """(main, compress) RoPE for SWA and c4/c128 layers respectively."""
    rp = f.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main = RopeSpec(
            float(rp["main"]["rope_theta"]), _parse_yarn(rp["main"], "rope_parameters.main")
        )
        if main.yarn is not None:
            raise ConfigError("rope_parameters.main", "no YaRN on SWA-only layers", rp["main"])
        comp = rp["compress"]
        return main, RopeSpec(
            float(comp["rope_theta"]), _parse_yarn(comp, "rope_parameters.compress")
        )
    scaling = f.get("rope_scaling") or (rp if rp else None)
    return (
        RopeSpec(f.number("rope_theta", 10000.0), None),
        RopeSpec(f.number("compress_rope_theta", 160000.0), _parse_yarn(scaling, "rope_scaling")),
    )


def _attn_schedule(f: _Fields, n_layers: int, n_mtp: int) -> list[AttnKind]:
    """Attention kind of every main layer, then of every MTP layer."""
    if f.has("compress_ratios"):
        ratios = f.get("compress_ratios")
        want = n_layers + n_mtp
        if not isinstance(ratios, list) or len(ratios) != want:
            got = len(ratios) if isinstance(ratios, list) else ratios
            raise ConfigError(
                "compress_ratios",
                f"a list of num_hidden_layers + num_nextn_predict_layers = {want} entries",
                f"length {got}" if isinstance(ratios, list) else got,
            )
        bad = [r for r in ratios if r not in _RATIOS]
        if bad:
            raise ConfigError("compress_ratios", f"entries in {sorted(_RATIOS)}", bad)
        return [_RATIOS[r] for r in ratios]
    if f.has("layer_types"):
        types = f.get("layer_types")
        if not isinstance(types, list) or len(types) != n_layers:
            got = f"length {len(types)}" if isinstance(types, list) else types
            raise ConfigError(
                "layer_types", f"a list of num_hidden_layers = {n_layers} entries", got
            )
        bad = [t for t in types if t not in _HF_LAYER_TYPES]
        if bad:
            raise ConfigError("layer_types", f"entries in {sorted(_HF_LAYER_TYPES)}", bad)
        rates = f.get("compress_rates") or {}
        for name, kind in _HF_LAYER_TYPES.items():
            if kind.compressed and rates.get(name, kind.ratio) != kind.ratio:
                raise ConfigError(f"compress_rates.{name}", str(kind.ratio), rates[name])
        # HF drops the MTP layers; by release they are SWA-only (compress_ratios entry 0).
        return [_HF_LAYER_TYPES[t] for t in types] + [AttnKind.SWA] * n_mtp
    # HF's silent fallback ("2x HCA then interleave") is offset by one from the real Pro schedule.
    raise ConfigError("compress_ratios", "the per-layer schedule (or HF `layer_types`)", None)


def _hash_schedule(f: _Fields, n_layers: int) -> list[bool]:
    if f.has("mlp_layer_types"):
        types = f.get("mlp_layer_types")
        if not isinstance(types, list) or len(types) != n_layers:
            got = f"length {len(types)}" if isinstance(types, list) else types
            raise ConfigError("mlp_layer_types", f"a list of {n_layers} entries", got)
        bad = [t for t in types if t not in _HF_MLP_TYPES]
        if bad:
            raise ConfigError("mlp_layer_types", f"entries in {sorted(_HF_MLP_TYPES)}", bad)
        return [_HF_MLP_TYPES[t] for t in types]
    n_hash = f.integer("num_hash_layers", 3, min_value=0)
    if n_hash > n_layers:
        raise ConfigError("num_hash_layers", f"at most num_hidden_layers = {n_layers}", n_hash)
    return [i < n_hash for i in range(n_layers)]


def _parse_quant(f: _Fields) -> QuantConfig | None:
    q = f.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError("quantization_config.quant_method", '"fp8"', method)
    block = tuple(q.get("weight_block_size") or (128, 128))
    if block != (128, 128):
        raise ConfigError("quantization_config.weight_block_size", "[128, 128]", list(block))
    scale_fmt = q.get("scale_fmt", "ue8m0")
    if scale_fmt not in ("ue8m0", None):
        raise ConfigError("quantization_config.scale_fmt", '"ue8m0"', scale_fmt)
    expert_dtype = f.get("expert_dtype", q.get("expert_dtype", "fp8"))
    if expert_dtype not in ("fp4", "fp8"):
        raise ConfigError("expert_dtype", '"fp4" or "fp8"', expert_dtype)
    return QuantConfig(weight_block=(128, 128), scale_fmt="ue8m0", expert_dtype=expert_dtype)


def _rope_dim(f: _Fields, head_dim: int) -> int:
    """RoPE channels per head: released ``qk_rope_head_dim``, else HF's ``partial_rotary_factor``
    of ``head_dim``, else the released 64. Even (rotated in pairs) and within the head."""
    if f.has("qk_rope_head_dim"):
        rope_dim = f.integer("qk_rope_head_dim")
    elif f.has("partial_rotary_factor"):
        rope_dim = round(head_dim * f.number("partial_rotary_factor"))
    else:
        rope_dim = 64
    if rope_dim % 2 or rope_dim > head_dim:
        raise ConfigError("qk_rope_head_dim", f"an even number <= head_dim = {head_dim}", rope_dim)
    return rope_dim


def _routing(f: _Fields) -> tuple[int, int, str]:
    """(routed experts, experts per token, scoring function) of the MoE router; its top-k is
    DeepSeek's ``noaux_tc`` (bias-corrected scores), the only method implemented."""
    n_experts = f.integer("n_routed_experts", 256)
    topk_experts = f.integer("num_experts_per_tok", 6)
    if topk_experts > n_experts:
        raise ConfigError(
            "num_experts_per_tok", f"at most n_routed_experts = {n_experts}", topk_experts
        )
    scoring = f.get("scoring_func", "sqrtsoftplus")
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise ConfigError("scoring_func", '"sqrtsoftplus", "sigmoid" or "softmax"', scoring)
    topk_method = f.get("topk_method", "noaux_tc")
    if topk_method != "noaux_tc":
        raise ConfigError("topk_method", '"noaux_tc"', topk_method)
    return n_experts, topk_experts, scoring


def _layer_specs(f: _Fields, n_layers: int, n_mtp: int) -> list[LayerSpec]:
    """The frozen schedule: main layers, then MTP layers (never hash-routed); compressed layers
    take the compress RoPE, SWA layers the main one."""
    main_rope, compress_rope = _rope_specs(f)
    kinds = _attn_schedule(f, n_layers, n_mtp)
    hashed = _hash_schedule(f, n_layers) + [False] * n_mtp
    return [
        LayerSpec(
            index=i,
            attn=kind,
            hash_moe=hashed[i],
            rope=compress_rope if kind.compressed else main_rope,
            is_mtp=i >= n_layers,
        )
        for i, kind in enumerate(kinds)
    ]


def _parse(raw: dict[str, Any]) -> DSV4Config:
    """Either spelling of config.json -> :class:`DSV4Config`; fields are checked in this order, so
    the first bad one is the one reported."""
    if not isinstance(raw, dict):
        raise ConfigError("<root>", "a JSON object", type(raw).__name__)
    f = _Fields(raw)
    model_type = f.get("model_type", "deepseek_v4")
    if model_type != "deepseek_v4":
        raise ConfigError("model_type", '"deepseek_v4"', model_type)

    hidden = f.integer("hidden_size")
    n_layers = f.integer("num_hidden_layers")
    n_heads = f.integer("num_attention_heads")
    head_dim = f.integer("head_dim", 512)
    n_mtp = f.integer("num_nextn_predict_layers", 1, min_value=0)
    if f.integer("num_key_value_heads", 1) != 1:
        raise ConfigError(
            "num_key_value_heads", "1 (DSV4 shares one K=V head)", f.get("num_key_value_heads")
        )

    rope_dim = _rope_dim(f, head_dim)
    o_groups = f.integer("o_groups", 8)
    if n_heads % o_groups:
        raise ConfigError("o_groups", f"a divisor of num_attention_heads = {n_heads}", o_groups)
    n_experts, topk_experts, scoring = _routing(f)
    index_head_dim = f.integer("index_head_dim", 128)
    if index_head_dim < rope_dim:
        raise ConfigError("index_head_dim", f">= qk_rope_head_dim = {rope_dim}", index_head_dim)
    specs = _layer_specs(f, n_layers, n_mtp)

    eos = f.get("eos_token_id", 1)
    return DSV4Config(
        vocab_size=f.integer("vocab_size"),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        head_dim=head_dim,
        rope_dim=rope_dim,
        q_lora_rank=f.integer("q_lora_rank", 1024),
        o_groups=o_groups,
        o_lora_rank=f.integer("o_lora_rank", 1024),
        sliding_window=f.integer("sliding_window", 128),
        index_n_heads=f.integer("index_n_heads", 64),
        index_head_dim=index_head_dim,
        index_topk=f.integer("index_topk", 512),
        hc_mult=f.integer("hc_mult", 4),
        hc_sinkhorn_iters=f.integer("hc_sinkhorn_iters", 20),
        hc_eps=f.number("hc_eps", 1e-6),
        n_routed_experts=n_experts,
        n_experts_per_tok=topk_experts,
        n_shared_experts=f.integer("n_shared_experts", 1, min_value=0),
        moe_inter_dim=f.integer("moe_intermediate_size", 2048),
        scoring_func=scoring,
        routed_scaling_factor=f.number("routed_scaling_factor", 1.5),
        swiglu_limit=f.number("swiglu_limit", 10.0),
        norm_eps=f.number("rms_norm_eps", 1e-6),
        max_position_embeddings=f.integer("max_position_embeddings", 1 << 20),
        bos_token_id=f.integer("bos_token_id", 0, min_value=0),
        eos_token_id=eos[0] if isinstance(eos, list) else int(eos),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", False)),
        quant=_parse_quant(f),
        layers=tuple(specs[:n_layers]),
        mtp_layers=tuple(specs[n_layers:]),
    )
