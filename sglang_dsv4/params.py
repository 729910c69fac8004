"""The parameter-spec table: every tensor of a DSV4 model (and of its MTP layers), written once.

One row per released tensor name: its shape (from the config), how a released checkpoint stores
it (:class:`Store`), how a model holds it (:class:`Role`: the module kind that owns it) and its
in-memory dtype (:class:`DType`). Everything else derives from these rows:

* :mod:`sglang_dsv4.weights.layout`: logical shapes and released storage formats;
* :class:`~sglang_dsv4.ref.model.RefDSV4`: the names it requires;
* the served model (:mod:`sglang_dsv4.model.deepseek_v4`, :mod:`sglang_dsv4.model.mtp`) and the
  trainer (:mod:`sglang_dsv4.train.model`): their module trees, built by :func:`declare` (the
  served model's routed / shared experts are banks, :mod:`sglang_dsv4.model.experts`, checked
  against these rows by tests);
* :func:`sglang_dsv4.train.model.export_state_dict`: the dtypes it writes.

A block's rows are relative names (``attn.wq_a.weight``) under a prefix: ``layers.{i}.`` for the
main layers, ``mtp.{j}.`` for the MTP layers. An MTP layer is one full block (SWA attention,
score-routed MoE, its own mHC) plus :data:`MTP_ROWS`: ``enorm`` / ``hnorm`` / ``e_proj`` /
``h_proj`` that mix the next token's embedding with the main model's last residual streams, and
its own ``hc_head_*`` and ``norm`` before the shared ``head`` (``embed`` and ``head`` are the
main model's; a released checkpoint has no MTP copy of them).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from sglang_dsv4.config import AttnKind, DSV4Config, LayerSpec

__all__ = [
    "BLOCK_ROWS",
    "MTP_ROWS",
    "TOP_ROWS",
    "DType",
    "Norm",
    "ParamSpec",
    "Role",
    "Store",
    "block_specs",
    "declare",
    "model_specs",
    "mtp_prefix",
    "mtp_specs",
    "param_specs",
    "plain_linear",
    "store_of",
]


class Store(enum.Enum):
    """How the released checkpoint stores a tensor (:mod:`sglang_dsv4.weights.layout`)."""

    FP8 = "fp8"  # e4m3 + 128x128 UE8M0 scales
    EXPERT = "expert"  # routed experts: MXFP4 or FP8 by the config's ``expert_dtype``
    BF16 = "bf16"
    FP32 = "fp32"
    I64 = "i64"


class Role(enum.Enum):
    """The module kind that owns a tensor (its row's ``owner``)."""

    LINEAR = "linear"  # ``weight`` [out, in] of a bias-free linear module at ``owner``
    EXPERT = "expert"  # an expert's linear: served as a bank row (model.experts), else LINEAR
    NORM = "norm"  # ``weight`` of an RMSNorm module at ``owner``
    EMBED = "embed"  # ``weight`` [vocab, d] of an embedding module at ``owner``
    PARAM = "param"  # a tensor attribute of ``owner``, trained by gradients
    BUFFER = "buffer"  # a tensor attribute of ``owner``, not trained by gradients


class DType(enum.Enum):
    """In-memory dtype: the model's, or fixed whatever the model dtype."""

    MODEL = "model"
    FP32 = "fp32"
    I64 = "i64"

    def torch(self, model: torch.dtype) -> torch.dtype:
        return {DType.MODEL: model, DType.FP32: torch.float32, DType.I64: torch.int64}[self]


@dataclass(frozen=True)
class ParamSpec:
    name: str  # released name
    shape: tuple[int, ...]
    store: Store
    role: Role
    dtype: DType = DType.MODEL
    init: float = 0.0  # value a fresh model holds (1 for norms and mHC scales)

    @property
    def owner(self) -> str:
        """Dotted path of the module holding the tensor ("" = the model itself)."""
        return self.name.rpartition(".")[0]

    @property
    def attr(self) -> str:
        return self.name.rpartition(".")[2]


Shape = Callable[[DSV4Config, LayerSpec], tuple[int, ...]]
When = Callable[[DSV4Config, LayerSpec], bool]


def _always(c: DSV4Config, s: LayerSpec) -> bool:
    return True


@dataclass(frozen=True)
class _Row:
    name: str  # relative; ``{e}`` = routed expert index
    shape: Shape
    store: Store
    role: Role
    dtype: DType = DType.MODEL
    init: float = 0.0
    when: When = _always


def _compressed(c, s) -> bool:
    return s.attn.compressed


def _csa(c, s) -> bool:
    return s.attn is AttnKind.CSA


def _hash(c, s) -> bool:
    return s.hash_moe


def _scored(c, s) -> bool:
    return not s.hash_moe


def _shared(c, s) -> bool:
    return c.n_shared_experts > 0


def _coff(s: LayerSpec) -> int:
    return 2 if s.attn is AttnKind.CSA else 1  # c4 compressors pool overlapping windows


def _norm(name: str, dim: Callable[[DSV4Config], int], when: When = _always) -> _Row:
    return _Row(name, lambda c, s: (dim(c),), Store.BF16, Role.NORM, init=1.0, when=when)


def _hc(prefix: str, rows: Callable[[DSV4Config], int], n_scale: int) -> tuple[_Row, ...]:
    """An mHC site: ``fn`` [rows, hc*d], ``base`` [rows], ``scale`` [n_scale], all fp32."""

    def flat(c):
        return c.hc_mult * c.hidden_size

    return (
        _Row(prefix + "fn", lambda c, s: (rows(c), flat(c)), Store.FP32, Role.PARAM, DType.FP32),
        _Row(prefix + "base", lambda c, s: (rows(c),), Store.FP32, Role.PARAM, DType.FP32),
        _Row(prefix + "scale", lambda c, s: (n_scale,), Store.FP32, Role.PARAM, DType.FP32, 1.0),
    )


def _compressor(p: str, head_dim: Callable, ratio: Callable, coff: Callable, when: When):
    """A compressor's rows: ``wkv`` / ``wgate`` [coff*D, d], ``ape`` [ratio, coff*D], ``norm``."""
    return (
        _Row(
            p + "wkv.weight",
            lambda c, s: (coff(s) * head_dim(c), c.hidden_size),
            Store.BF16,
            Role.LINEAR,
            when=when,
        ),
        _Row(
            p + "wgate.weight",
            lambda c, s: (coff(s) * head_dim(c), c.hidden_size),
            Store.BF16,
            Role.LINEAR,
            when=when,
        ),
        _Row(
            p + "ape",
            lambda c, s: (ratio(s), coff(s) * head_dim(c)),
            Store.FP32,
            Role.PARAM,
            when=when,
        ),
        _norm(p + "norm.weight", head_dim, when),
    )


def _expert(p: str, inter: Callable[[DSV4Config], int], store: Store, when: When = _always):
    d = lambda c: c.hidden_size  # noqa: E731
    return (
        _Row(p + "w1.weight", lambda c, s: (inter(c), d(c)), store, Role.EXPERT, when=when),
        _Row(p + "w2.weight", lambda c, s: (d(c), inter(c)), store, Role.EXPERT, when=when),
        _Row(p + "w3.weight", lambda c, s: (inter(c), d(c)), store, Role.EXPERT, when=when),
    )


def _linear(name: str, shape: Shape, store: Store = Store.FP8, when: When = _always) -> _Row:
    return _Row(name, shape, store, Role.LINEAR, when=when)


_D = lambda c: c.hidden_size  # noqa: E731
_HC_MIX = lambda c: c.hc_mix_dim  # noqa: E731
_HC = lambda c: c.hc_mult  # noqa: E731

TOP_ROWS: tuple[_Row, ...] = (
    _Row("embed.weight", lambda c, s: (c.vocab_size, c.hidden_size), Store.BF16, Role.EMBED),
    _linear("head.weight", lambda c, s: (c.vocab_size, c.hidden_size), Store.BF16),
    _norm("norm.weight", _D),
    *_hc("hc_head_", _HC, 1),
)
"""The model's own tensors (outside the layers)."""

BLOCK_ROWS: tuple[_Row, ...] = (
    _norm("attn_norm.weight", _D),
    _norm("ffn_norm.weight", _D),
    *_hc("hc_attn_", _HC_MIX, 3),
    *_hc("hc_ffn_", _HC_MIX, 3),
    _linear("attn.wq_a.weight", lambda c, s: (c.q_lora_rank, c.hidden_size)),
    _norm("attn.q_norm.weight", lambda c: c.q_lora_rank),
    _linear("attn.wq_b.weight", lambda c, s: (c.num_heads * c.head_dim, c.q_lora_rank)),
    _linear("attn.wkv.weight", lambda c, s: (c.head_dim, c.hidden_size)),
    _norm("attn.kv_norm.weight", lambda c: c.head_dim),
    _linear(
        "attn.wo_a.weight",
        lambda c, s: (c.o_groups * c.o_lora_rank, c.num_heads * c.head_dim // c.o_groups),
    ),
    _linear("attn.wo_b.weight", lambda c, s: (c.hidden_size, c.o_groups * c.o_lora_rank)),
    # fp32 as released (and as FlashMLA / SparseMQA take it: no cast kernel per layer)
    _Row("attn.attn_sink", lambda c, s: (c.num_heads,), Store.FP32, Role.PARAM, DType.FP32),
    *_compressor("attn.compressor.", lambda c: c.head_dim, lambda s: s.ratio, _coff, _compressed),
    _linear(
        "attn.indexer.wq_b.weight",
        lambda c, s: (c.index_n_heads * c.index_head_dim, c.q_lora_rank),
        when=_csa,
    ),
    _linear(
        "attn.indexer.weights_proj.weight",
        lambda c, s: (c.index_n_heads, c.hidden_size),
        Store.BF16,
        when=_csa,
    ),
    *_compressor(
        "attn.indexer.compressor.",
        lambda c: c.index_head_dim,
        lambda s: AttnKind.CSA.ratio,
        lambda s: 2,
        _csa,
    ),
    _Row(
        "ffn.gate.weight", lambda c, s: (c.n_routed_experts, c.hidden_size), Store.BF16, Role.PARAM
    ),
    _Row(
        "ffn.gate.tid2eid",
        lambda c, s: (c.vocab_size, c.n_experts_per_tok),
        Store.I64,
        Role.BUFFER,
        DType.I64,
        when=_hash,
    ),
    # noaux_tc selection bias: moved by the load-balancing rule, not by gradients
    _Row(
        "ffn.gate.bias",
        lambda c, s: (c.n_routed_experts,),
        Store.FP32,
        Role.BUFFER,
        DType.FP32,
        when=_scored,
    ),
    *_expert("ffn.experts.{e}.", lambda c: c.moe_inter_dim, Store.EXPERT),
    *_expert(
        "ffn.shared_experts.",
        lambda c: c.moe_inter_dim * c.n_shared_experts,
        Store.FP8,
        _shared,
    ),
)
"""One decoder block's tensors, relative to ``layers.{i}.`` (or ``mtp.{j}.``)."""

MTP_ROWS: tuple[_Row, ...] = (
    _norm("enorm.weight", _D),
    _norm("hnorm.weight", _D),
    _linear("e_proj.weight", lambda c, s: (c.hidden_size, c.hidden_size)),
    _linear("h_proj.weight", lambda c, s: (c.hidden_size, c.hidden_size)),
    _norm("norm.weight", _D),
    *_hc("hc_head_", _HC, 1),
)
"""An MTP layer's tensors besides its block, relative to ``mtp.{j}.``."""


def _expand(rows: Iterable[_Row], cfg: DSV4Config, spec: LayerSpec | None, prefix: str):
    """Rows -> specs in row order; the routed-expert rows (``{e}``) expert by expert."""
    out: dict[str, ParamSpec] = {}
    rows = [r for r in rows if spec is None or r.when(cfg, spec)]
    per_expert = [r for r in rows if "{e}" in r.name]
    for r in rows:
        if per_expert and r is per_expert[0]:
            for e in range(cfg.n_routed_experts):
                for x in per_expert:
                    n = prefix + x.name.format(e=e)
                    out[n] = ParamSpec(n, x.shape(cfg, spec), x.store, x.role, x.dtype, x.init)
        if "{e}" not in r.name:
            n = prefix + r.name
            out[n] = ParamSpec(n, r.shape(cfg, spec), r.store, r.role, r.dtype, r.init)
    return out


def block_specs(cfg: DSV4Config, spec: LayerSpec, prefix: str = "") -> dict[str, ParamSpec]:
    """The tensors of one decoder block of kind ``spec``, names under ``prefix``."""
    return _expand(BLOCK_ROWS, cfg, spec, prefix)


def mtp_prefix(j: int) -> str:
    return f"mtp.{j}."


def mtp_specs(cfg: DSV4Config, j: int, prefix: str | None = None) -> dict[str, ParamSpec]:
    """The tensors of MTP layer ``j`` (its block + :data:`MTP_ROWS`), under ``prefix``
    (default ``mtp.{j}.``)."""
    p = mtp_prefix(j) if prefix is None else prefix
    spec = cfg.mtp_layers[j]
    return block_specs(cfg, spec, p) | _expand(MTP_ROWS, cfg, spec, p)


def model_specs(cfg: DSV4Config) -> dict[str, ParamSpec]:
    """The main model's tensors (no MTP layers)."""
    out = _expand(TOP_ROWS, cfg, None, "")
    for s in cfg.layers:
        out |= block_specs(cfg, s, f"layers.{s.index}.")
    return out


def param_specs(cfg: DSV4Config, mtp: bool = True) -> dict[str, ParamSpec]:
    """Every tensor of the model, and of its MTP layers when ``mtp``."""
    out = model_specs(cfg)
    if mtp:
        for j in range(len(cfg.mtp_layers)):
            out |= mtp_specs(cfg, j)
    return out


_PREFIX = re.compile(r"(?:layers|mtp)\.\d+\.")
_EXPERT = re.compile(r"ffn\.experts\.\d+\.")
_STORE: dict[str, Store] = {}
for _r in (*TOP_ROWS, *BLOCK_ROWS, *MTP_ROWS):
    _STORE.setdefault(_r.name.replace("{e}.", "#."), _r.store)
# an MTP layer's ``norm.weight`` and ``hc_head_*`` store as the model's own: no clash
assert all(_STORE[_r.name] is _r.store for _r in MTP_ROWS)


def store_of(name: str) -> Store:
    """Released storage of tensor ``name`` (any layer or MTP layer), from the rows alone."""
    rel = _PREFIX.sub("", name, count=1) if _PREFIX.match(name) else name
    rel = _EXPERT.sub("ffn.experts.#.", rel, count=1)
    store = _STORE.get(rel)
    if store is None:
        raise KeyError(f"`{name}` is not a DSV4 tensor name (sglang_dsv4.params)")
    return store


# ---------------------------------------------------------------------------------------------
# module trees from the rows


class Norm(nn.Module):
    """An RMSNorm's weight holder (the math is :func:`sglang_dsv4.ref.norm.rms_norm`)."""

    def __init__(self, n: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype))


def plain_linear(name: str, n_in: int, n_out: int) -> nn.Module:
    return nn.Linear(n_in, n_out, bias=False)


LinearFactory = Callable[[str, int, int], nn.Module]
"""``(released prefix ``layers.0.attn.wq_a``, n_in, n_out) -> module``."""


def declare(
    root: nn.Module,
    specs: Iterable[ParamSpec],
    *,
    strip: str = "",
    linear: LinearFactory = plain_linear,
) -> None:
    """Build the modules and tensors of ``specs`` under ``root``: each name minus ``strip`` is a
    path from ``root``; containers are plain modules (a ``ModuleList`` where the next segment is
    an index); LINEAR / EXPERT rows become ``linear(name, n_in, n_out)``, NORM rows
    :class:`Norm`, EMBED rows ``nn.Embedding``, PARAM rows parameters and BUFFER rows buffers,
    filled with the row's ``init``. The model dtype is torch's default dtype (SGLang builds a
    model under it)."""
    dtype = torch.get_default_dtype()
    for s in specs:
        rel = s.name.removeprefix(strip)
        owner_path, _, attr = rel.rpartition(".")
        if s.role in (Role.LINEAR, Role.EXPERT, Role.NORM, Role.EMBED):
            parent_path, _, leaf = owner_path.rpartition(".")
            parent = _container(root, parent_path, leaf)
            _add(parent, leaf, _leaf_module(s, linear, dtype))
            continue
        owner = _container(root, owner_path, None)
        t = torch.full(s.shape, s.init, dtype=s.dtype.torch(dtype))
        if s.role is Role.PARAM:
            owner.register_parameter(attr, nn.Parameter(t))
        else:
            owner.register_buffer(attr, t)


def _leaf_module(s: ParamSpec, linear: LinearFactory, dtype: torch.dtype) -> nn.Module:
    if s.role is Role.NORM:
        return Norm(s.shape[0], dtype)
    if s.role is Role.EMBED:
        return nn.Embedding(*s.shape, dtype=dtype)
    n_out, n_in = s.shape
    return linear(s.owner, n_in, n_out)


def _container(root: nn.Module, path: str, child: str | None) -> nn.Module:
    """The module at dotted ``path`` under ``root``, made (plain, or a ModuleList when its next
    segment is an index) where missing; ``child`` = the segment that follows ``path``."""
    node = root
    segs = path.split(".") if path else []
    for i, seg in enumerate(segs):
        nxt = segs[i + 1] if i + 1 < len(segs) else child
        if isinstance(node, nn.ModuleList):
            existing = node[int(seg)] if int(seg) < len(node) else None
        else:
            existing = node._modules.get(seg)
        if existing is None:
            existing = nn.ModuleList() if nxt is not None and nxt.isdigit() else nn.Module()
            _add(node, seg, existing)
        node = existing
    return node


def _add(parent: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        if int(name) != len(parent):
            raise ValueError(f"index {name} declared out of order (have {len(parent)})")
        parent.append(module)
    else:
        parent.add_module(name, module)
