"""What a DSV4 checkpoint holds: every tensor's logical shape and, per format, how it is stored.

Logical tensors are the dense weights the math uses, under released names
(:func:`logical_shapes`; MTP layers as ``mtp.{j}.*``). A checkpoint stores each one as

* ``Fmt.DENSE``: one floating tensor of the logical shape (HF-transformers checkpoints, our fp32
  tiny models; any floating dtype);
* in the released format (config.json has a ``quantization_config``), per :func:`released_fmt`:

  ========================  =============================================================
  ``Fmt.FP8``               ``X.weight`` F8_E4M3 [N, K] + ``X.scale`` F8_E8M0
                            [ceil(N/128), ceil(K/128)]: attention ``wq_a wq_b wkv wo_a wo_b``,
                            ``indexer.wq_b``, shared experts, MTP ``e_proj h_proj``, and the
                            routed experts when ``expert_dtype`` is ``fp8``
  ``Fmt.MXFP4``             ``X.weight`` I8 [N, K/2] + ``X.scale`` F8_E8M0 [N, K/32]: routed
                            experts (``expert_dtype: fp4``)
  ``Fmt.BF16``              embed, head, every norm weight, compressor ``wkv``/``wgate``,
                            ``indexer.weights_proj``, router ``gate.weight``
  ``Fmt.FP32``              ``attn_sink``, compressor ``ape``, all ``hc_*``, router ``gate.bias``
  ``Fmt.I64``               ``gate.tid2eid`` [vocab, k]
  ========================  =============================================================

The packing of FP8 / MXFP4 is defined in :mod:`sglang_dsv4.ref.weight_quant`.
"""

import enum
import re
from dataclasses import dataclass

import torch

from sglang_dsv4.config import AttnKind, DSV4Config, LayerSpec
from sglang_dsv4.ref.weight_quant import (
    FP8_BLOCK,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    fp8_block_dequant,
    fp8_block_quant,
    mxfp4_dequant,
    mxfp4_quant,
    nvfp4_dequant,
)

__all__ = [
    "Fmt",
    "StoredWeight",
    "TensorSpec",
    "logical_shapes",
    "pack",
    "released_fmt",
    "stored_bytes",
    "stored_specs",
]


class Fmt(enum.Enum):
    DENSE = "dense"
    FP8 = "fp8"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"  # not in released files: made at load (sglang_dsv4.weights.nvfp4)
    BF16 = "bf16"
    FP32 = "fp32"
    I64 = "i64"

    @property
    def quantized(self) -> bool:
        return self in (Fmt.FP8, Fmt.MXFP4, Fmt.NVFP4)


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's shape and dtype; ``dtype`` None = any floating dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None

    def describe(self) -> str:
        return f"{self.shape} {self.dtype if self.dtype is not None else 'floating'}"

    def matches(self, t: torch.Tensor) -> bool:
        if tuple(t.shape) != self.shape:
            return False
        if self.dtype is None:
            return t.dtype.is_floating_point and t.dtype.itemsize >= 2
        return t.dtype == self.dtype


def describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype}"


@dataclass(frozen=True)
class StoredWeight:
    """One logical tensor as stored: ``scale`` for FP8 / MXFP4 / NVFP4, ``global_scale`` for
    NVFP4 (layouts in :mod:`sglang_dsv4.ref.weight_quant`)."""

    fmt: Fmt
    data: torch.Tensor
    scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        if self.fmt is Fmt.FP8:
            return fp8_block_dequant(self.data, self.scale, dtype)
        if self.fmt is Fmt.MXFP4:
            return mxfp4_dequant(self.data, self.scale, dtype)
        if self.fmt is Fmt.NVFP4:
            return nvfp4_dequant(self.data, self.scale, self.global_scale, dtype)
        return self.data

    @property
    def nbytes(self) -> int:
        parts = (self.data, self.scale, self.global_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


# released name (without the ``.weight`` / no suffix) -> format; first match wins
_RELEASED_RULES: tuple[tuple[str, Fmt | str], ...] = (
    (r".*\.ffn\.experts\.\d+\.w[123]\.weight", "experts"),
    (r".*\.(hc_(attn|ffn)_(fn|base|scale)|hc_head_(fn|base|scale))", Fmt.FP32),
    (r"hc_head_(fn|base|scale)", Fmt.FP32),
    (r".*\.attn\.attn_sink|.*\.compressor\.ape|.*\.ffn\.gate\.bias", Fmt.FP32),
    (r".*\.ffn\.gate\.tid2eid", Fmt.I64),
    (r".*\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight", Fmt.FP8),
    (r".*\.attn\.indexer\.wq_b\.weight", Fmt.FP8),
    (r".*\.ffn\.shared_experts\.w[123]\.weight", Fmt.FP8),
    (r"mtp\.\d+\.(e_proj|h_proj)\.weight", Fmt.FP8),
    (r".*", Fmt.BF16),  # embed, head, norms, compressor wkv/wgate, weights_proj, gate.weight
)
_RELEASED = tuple((re.compile(p + r"\Z"), f) for p, f in _RELEASED_RULES)


def released_fmt(name: str, expert_dtype: str) -> Fmt:
    """Storage format of logical tensor ``name`` in the released checkpoint."""
    for pattern, fmt in _RELEASED:
        if pattern.match(name):
            if fmt == "experts":
                return Fmt.MXFP4 if expert_dtype == "fp4" else Fmt.FP8
            return fmt
    raise AssertionError("unreachable: the last rule matches everything")


def stored_specs(name: str, shape: tuple[int, ...], fmt: Fmt) -> dict[str, TensorSpec]:
    """The checkpoint tensors (name -> spec) holding logical ``name`` of ``shape`` in ``fmt``."""
    if not fmt.quantized:
        dtype = {
            Fmt.DENSE: None,
            Fmt.BF16: torch.bfloat16,
            Fmt.FP32: torch.float32,
            Fmt.I64: torch.int64,
        }[fmt]
        if fmt is Fmt.DENSE and name.endswith("tid2eid"):
            dtype = torch.int64
        return {name: TensorSpec(shape, dtype)}
    if fmt is Fmt.NVFP4:
        raise ValueError("NVFP4 is made at load time; released checkpoints do not store it")
    n, k = shape
    scale_name = name.removesuffix(".weight") + ".scale"
    if fmt is Fmt.FP8:
        blocks = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        return {
            name: TensorSpec((n, k), torch.float8_e4m3fn),
            scale_name: TensorSpec(blocks, torch.float8_e8m0fnu),
        }
    return {
        name: TensorSpec((n, k // 2), torch.int8),
        scale_name: TensorSpec((n, k // MXFP4_BLOCK), torch.float8_e8m0fnu),
    }


def stored_bytes(shape: tuple[int, ...], fmt: Fmt) -> int:
    """Bytes that a logical tensor of ``shape`` takes in ``fmt`` (data + scales)."""
    n = 1
    for d in shape:
        n *= d
    if fmt is Fmt.FP8:
        return n + -(-shape[0] // FP8_BLOCK) * -(-shape[1] // FP8_BLOCK)
    if fmt is Fmt.MXFP4:
        return n // 2 + n // MXFP4_BLOCK
    if fmt is Fmt.NVFP4:
        return n // 2 + n // NVFP4_BLOCK + 4
    return n * {Fmt.BF16: 2, Fmt.FP32: 4, Fmt.I64: 8, Fmt.DENSE: 4}[fmt]


def pack(t: torch.Tensor, fmt: Fmt) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logical tensor ``t`` -> (data, scale) as stored in ``fmt`` (scale None if unquantized)."""
    if fmt is Fmt.FP8:
        return fp8_block_quant(t)
    if fmt is Fmt.MXFP4:
        return mxfp4_quant(t)
    dtype = {Fmt.BF16: torch.bfloat16, Fmt.FP32: torch.float32, Fmt.I64: torch.int64}.get(fmt)
    return (t.to(dtype) if dtype is not None else t).contiguous(), None


def logical_shapes(cfg: DSV4Config, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every logical tensor of the model (and of its MTP layers) with its dense shape."""
    d, hc = cfg.hidden_size, cfg.hc_mult
    shapes = {
        "embed.weight": (cfg.vocab_size, d),
        "head.weight": (cfg.vocab_size, d),
        "norm.weight": (d,),
        "hc_head_fn": (hc, hc * d),
        "hc_head_base": (hc,),
        "hc_head_scale": (1,),
    }
    for spec in cfg.layers:
        shapes |= _block_shapes(cfg, spec, f"layers.{spec.index}.")
    if mtp:
        for j, spec in enumerate(cfg.mtp_layers):
            p = f"mtp.{j}."
            shapes |= _block_shapes(cfg, spec, p)
            shapes |= {p + f"{n}.weight": (d, d) for n in ("e_proj", "h_proj")}
            shapes |= {p + f"{n}.weight": (d,) for n in ("enorm", "hnorm", "norm")}
            shapes |= {p + "hc_head_fn": (hc, hc * d), p + "hc_head_base": (hc,)}
            shapes[p + "hc_head_scale"] = (1,)
    return shapes


def _block_shapes(cfg: DSV4Config, spec: LayerSpec, p: str) -> dict[str, tuple[int, ...]]:
    d, hd, hc = cfg.hidden_size, cfg.head_dim, cfg.hc_mult
    s = {p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,)}
    for site in ("attn", "ffn"):
        s |= {
            p + f"hc_{site}_fn": (cfg.hc_mix_dim, hc * d),
            p + f"hc_{site}_base": (cfg.hc_mix_dim,),
            p + f"hc_{site}_scale": (3,),
        }
    a = p + "attn."
    s |= {
        a + "wq_a.weight": (cfg.q_lora_rank, d),
        a + "q_norm.weight": (cfg.q_lora_rank,),
        a + "wq_b.weight": (cfg.num_heads * hd, cfg.q_lora_rank),
        a + "wkv.weight": (hd, d),
        a + "kv_norm.weight": (hd,),
        a + "wo_a.weight": (cfg.o_groups * cfg.o_lora_rank, cfg.num_heads * hd // cfg.o_groups),
        a + "wo_b.weight": (d, cfg.o_groups * cfg.o_lora_rank),
        a + "attn_sink": (cfg.num_heads,),
    }
    if spec.attn.compressed:
        s |= _compressor_shapes(a + "compressor.", d, hd, spec.ratio, spec.attn is AttnKind.CSA)
    if spec.attn is AttnKind.CSA:
        ihd, ratio = cfg.index_head_dim, AttnKind.CSA.ratio
        s |= {
            a + "indexer.wq_b.weight": (cfg.index_n_heads * ihd, cfg.q_lora_rank),
            a + "indexer.weights_proj.weight": (cfg.index_n_heads, d),
        }
        s |= _compressor_shapes(a + "indexer.compressor.", d, ihd, ratio, overlap=True)
    f = p + "ffn."
    s[f + "gate.weight"] = (cfg.n_routed_experts, d)
    if spec.hash_moe:
        s[f + "gate.tid2eid"] = (cfg.vocab_size, cfg.n_experts_per_tok)
    else:
        s[f + "gate.bias"] = (cfg.n_routed_experts,)
    inter = cfg.moe_inter_dim
    for e in range(cfg.n_routed_experts):
        s |= _expert_shapes(f + f"experts.{e}.", d, inter)
    if cfg.n_shared_experts:
        s |= _expert_shapes(f + "shared_experts.", d, inter * cfg.n_shared_experts)
    return s


def _compressor_shapes(p: str, d: int, hd: int, ratio: int, overlap: bool):
    coff = 2 if overlap else 1
    return {
        p + "wkv.weight": (coff * hd, d),
        p + "wgate.weight": (coff * hd, d),
        p + "ape": (ratio, coff * hd),
        p + "norm.weight": (hd,),
    }


def _expert_shapes(p: str, d: int, inter: int):
    return {p + "w1.weight": (inter, d), p + "w2.weight": (d, inter), p + "w3.weight": (inter, d)}
