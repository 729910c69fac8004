"""A batched, differentiable DSV4 for training: the math of :mod:`sglang_dsv4.ref` over ``[B, S]``.

The module tree is built from the parameter-spec table (:mod:`sglang_dsv4.params`), so it spells
the released tensor names (``layers.{i}.attn.wq_a.weight``,
``layers.{i}.ffn.experts.{e}.w1.weight``, ``hc_head_fn`` ...) and ``state_dict()`` is a checkpoint
that our server and HF transformers load as is (:func:`export_state_dict` picks the dtypes).
Token-wise parts (mHC, norms, MoE, head) reuse the reference functions on the flattened
``N = B * S`` tokens; the sequence-mixing parts are written for whole training sequences:

* compressor: every complete window of ``ratio`` tokens pooled at once (c4: the a-half of window
  ``i-1`` and the b-half of window ``i``), then norm and RoPE at ``i * ratio`` (``ref.compressor``);
* attention: one softmax per query over its ``swa_window`` (blocks of ``W`` queries against their
  own and the previous block's keys, ``W`` = ``sliding_window``), its compressed entries (c128: all
  visible; c4: the indexer's top-k of the visible ones, or all of them while ``sparse=False``)
  and the per-head sink;
* MoE: every expert on every token (8 small experts: cheaper than a host sync per expert), mixed
  by the routing weights, which are zero for experts not chosen.

The c4 indexer is trained apart from the language-model loss (its inputs are detached, and the
top-k choice has no gradient): ``indexer_kl`` is KL(p || softmax(I)) over the visible entries,
where ``p`` is the main attention's probability mass over the compressed entries (softmax over
the visible entries per head, averaged over heads, without gradient), as DeepSeek trains its
lightning indexer. ``S`` must be a multiple of ``sliding_window`` (pad the tail: causality keeps
real positions exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sglang_dsv4.config import AttnKind, DSV4Config, LayerSpec
from sglang_dsv4.params import (
    Store,
    block_specs,
    declare,
    model_specs,
    mtp_prefix,
    mtp_specs,
    store_of,
)
from sglang_dsv4.ref.attention import grouped_output_proj
from sglang_dsv4.ref.mhc import hc_head, hc_post, hc_pre
from sglang_dsv4.ref.moe import route_scores, route_weights
from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["ForwardOut", "TrainDSV4", "export_state_dict", "init_weights"]


def _compress(comp: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float):
    """Compressor ``comp`` (rows ``*.compressor.*`` of :mod:`sglang_dsv4.params`): ``x``
    [B, S, d] -> entries [B, S // ratio, D] of every complete window; ``cos``/``sin``
    [S // ratio, rope_dim / 2] at the entries' positions ``i * ratio``."""
    b, s, _ = x.shape
    r, d = comp.ape.shape[0], comp.norm.weight.shape[0]
    overlap = comp.ape.shape[1] == 2 * d
    n = s // r
    kv = comp.wkv(x[:, : n * r]).float().view(b, n, r, -1)  # [B, E, r, coff*D]
    score = comp.wgate(x[:, : n * r]).float().view(b, n, r, -1) + comp.ape.float()
    if overlap:  # entry i pools the a-half of window i-1 and the b-half of window i
        prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))
        prev_score = F.pad(score[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
        kv = torch.cat([prev_kv, kv[..., d:]], dim=2)  # [B, E, 2r, D]
        score = torch.cat([prev_score, score[..., d:]], dim=2)
    entries = (kv * score.softmax(dim=2)).sum(dim=2)  # [B, E, D]
    entries = rms_norm(entries, comp.norm.weight.float(), eps)
    return _rope(entries, cos, sin)


def _index_scores(indexer: nn.Module, cfg: DSV4Config, x, qr, cos, sin, ecos, esin):
    """Indexer scores [B, S, E] (eq. 16) of queries at every position against every entry."""
    b, s, _ = x.shape
    n_heads, head_dim = cfg.index_n_heads, cfg.index_head_dim
    keys = _compress(indexer.compressor, x, ecos, esin, cfg.norm_eps)  # [B, E, Di]
    q = _rope(indexer.wq_b(qr).view(b, s, n_heads, head_dim), cos, sin)
    w = indexer.weights_proj(x).float() * n_heads**-0.5  # [B, S, Hi]
    # [B, S, Hi, E]: the largest activation of training (bf16 under autocast)
    dots = torch.einsum("bshd,bed->bshe", q, keys).relu() * head_dim**-0.5
    return torch.einsum("bshe,bsh->bse", dots, w.to(dots.dtype)).float()


class _Block(nn.Module):
    """One decoder block: every row of :func:`sglang_dsv4.params.block_specs` (experts as
    plain linears)."""

    def __init__(self, cfg: DSV4Config, spec: LayerSpec, prefix: str, mtp: int | None = None):
        super().__init__()
        self.spec = spec
        specs = block_specs(cfg, spec, prefix) if mtp is None else mtp_specs(cfg, mtp, prefix)
        declare(self, specs.values(), strip=prefix)


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [B, S, vocab]
    indexer_kl: torch.Tensor | None = None  # mean over c4 layers
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E] counts
    recall: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [2] (set, mass)
    mtp_logits: torch.Tensor | None = None  # [B, S, vocab]: position t predicts token t+2


class TrainDSV4(nn.Module):
    """``TrainDSV4(cfg)(ids [B, S]) -> ForwardOut``. ``dropout`` (training mode only) applies to
    the embedding and to every block output before it enters the residual streams."""

    def __init__(self, cfg: DSV4Config, dropout: float = 0.0, mtp: bool = False):
        super().__init__()
        self.cfg = cfg
        self.dropout = dropout
        # embed, head, norm, hc_head_*, then the layers: the parameter-spec table's rows
        declare(self, [s for s in model_specs(cfg).values() if not s.name.startswith("layers.")])
        self.layers = nn.ModuleList(
            _Block(cfg, spec, f"layers.{spec.index}.") for spec in cfg.layers
        )
        # MTP layer 0 (``mtp.0.*``: its block and the MTP rows), trained next to the model
        self.mtp = None
        if mtp:
            if not cfg.mtp_layers:
                raise ValueError("mtp=True needs num_nextn_predict_layers >= 1 in the config")
            self.mtp = nn.ModuleList([_Block(cfg, cfg.mtp_layers[0], mtp_prefix(0), mtp=0)])
        for spec in cfg.layers + cfg.mtp_layers:
            self.register_buffer(
                f"inv_freq_{spec.index}", rope_inv_freq(spec.rope, cfg.rope_dim), persistent=False
            )

    def forward(
        self,
        ids: torch.Tensor,
        sparse: bool = True,
        indexer_kl: bool = False,
        recall: bool = False,
    ) -> ForwardOut:
        """``sparse``: c4 layers attend to the indexer's top-k (else to every visible entry);
        ``indexer_kl``: also return the indexer's KL loss; ``recall``: per c4 layer, the indexer
        top-k's recall of the dense attention's top-k entries and the attention mass it covers,
        over queries that see more than ``index_topk`` entries."""
        cfg = self.cfg
        b, s = ids.shape
        if s % cfg.sliding_window:
            raise ValueError(f"sequence length {s} is not a multiple of {cfg.sliding_window}")
        out = ForwardOut(logits=ids.new_empty(0))
        kls = []
        x = self._drop(self.embed(ids).flatten(0, 1))  # [N, d]
        x = x.unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()  # [N, hc, d]
        flat_ids = ids.flatten()
        for block in self.layers:
            x = self._block(block, x, flat_ids, (b, s), (sparse, indexer_kl, recall), out, kls)
        out.logits = self._logits(self, x).view(b, s, -1)
        if kls:
            out.indexer_kl = torch.stack(kls).mean()
        if self.mtp is not None:
            out.mtp_logits = self._mtp(ids, x, sparse)
        return out

    def _block(self, block, x, flat_ids, shape, flags, out: ForwardOut, kls: list):
        """One decoder block over the streams ``x`` [N, hc, d] (``shape`` = (B, S))."""
        cfg, spec = self.cfg, block.spec
        u, post, comb = self._hc_pre(block, "attn", x)
        h = rms_norm(u, block.attn_norm.weight, cfg.norm_eps).view(*shape, -1)
        y, aux = self._attention(block, h, *flags)
        if aux.get("kl") is not None:
            kls.append(aux["kl"])
        if aux.get("recall") is not None:
            out.recall[spec.index] = aux["recall"]
        x = hc_post(self._drop(y), x, post, comb)
        u, post, comb = self._hc_pre(block, "ffn", x)
        h = rms_norm(u, block.ffn_norm.weight, cfg.norm_eps)
        y, load = self._moe(block, h, flat_ids)
        if load is not None:
            out.expert_load[spec.index] = load
        return hc_post(self._drop(y), x, post, comb)

    def _logits(self, owner, x: torch.Tensor) -> torch.Tensor:
        """Streams [N, hc, d] -> logits [N, vocab] through ``owner``'s hc_head and norm."""
        cfg = self.cfg
        u = hc_head(
            x, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale, cfg.hc_eps, cfg.norm_eps
        )
        return self.head(rms_norm(u, owner.norm.weight, cfg.norm_eps))

    def _mtp(self, ids: torch.Tensor, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        """MTP layer 0 (:mod:`sglang_dsv4.ref.mtp`): position ``t`` pairs the main streams
        ``x[t]`` with token ``t+1`` and predicts token ``t+2``; logits [B, S, vocab] (the last
        two positions have no target)."""
        cfg, m = self.cfg, self.mtp[0]
        b, s = ids.shape
        nxt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # [B, S]; the last row is padding
        e = m.e_proj(rms_norm(self.embed(nxt).flatten(0, 1), m.enorm.weight, cfg.norm_eps))
        xm = e.unsqueeze(1) + m.h_proj(rms_norm(x, m.hnorm.weight, cfg.norm_eps))  # [N, hc, d]
        xm = self._block(
            m, xm, nxt.flatten(), (b, s), (sparse, False, False), ForwardOut(logits=e), []
        )
        return self._logits(m, xm).view(b, s, -1)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def _hc_pre(self, block: _Block, site: str, x: torch.Tensor):
        cfg = self.cfg
        fn, base, scale = (getattr(block, f"hc_{site}_{k}") for k in ("fn", "base", "scale"))
        return hc_pre(x, fn, base, scale, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)

    def _attention(self, block: _Block, x: torch.Tensor, sparse, want_kl, want_recall):
        """``x`` [B, S, d] (normed) -> ([B, S, d], aux)."""
        cfg, spec, attn = self.cfg, block.spec, block.attn
        b, s, _ = x.shape
        n_heads, d, w = cfg.num_heads, cfg.head_dim, cfg.sliding_window
        inv_freq = getattr(self, f"inv_freq_{spec.index}")
        positions = torch.arange(s, device=x.device)
        cos, sin = rope_cos_sin(positions, inv_freq)  # [S, rd/2]
        qr = rms_norm(attn.wq_a(x), attn.q_norm.weight, cfg.norm_eps)  # [B, S, q_lora]
        q = rms_norm(attn.wq_b(qr).view(b, s, n_heads, d), None, cfg.norm_eps)
        q = _rope(q, cos, sin)  # [B, S, H, D]
        kv = _rope(rms_norm(attn.wkv(x), attn.kv_norm.weight, cfg.norm_eps), cos, sin)  # [B,S,D]
        scale = d**-0.5

        # swa_window: block n of W queries against blocks n-1 and n
        nb = s // w
        kb = kv.view(b, nb, w, d)
        win_keys = torch.cat([F.pad(kb[:, :-1], (0, 0, 0, 0, 1, 0)), kb], dim=2)  # [B,nb,2W,D]
        win_logits = torch.einsum("bnqhd,bnkd->bnqhk", q.view(b, nb, w, n_heads, d), win_keys)
        win_mask = _window_mask(nb, w, x.device)[None, :, :, None]  # [1, nb, W, 1, 2W]
        win_logits = (win_logits * scale).masked_fill(~win_mask, float("-inf"))
        parts = [win_logits.reshape(b, s, n_heads, 2 * w)]

        aux: dict = {}
        entries = None
        if spec.attn.compressed:
            r = spec.ratio
            ecos, esin = rope_cos_sin(torch.arange(s // r, device=x.device) * r, inv_freq)
            entries = _compress(attn.compressor, x, ecos, esin, cfg.norm_eps).to(q.dtype)
            comp_logits = torch.einsum("bshd,bed->bshe", q, entries) * scale  # [B, S, H, E]
            visible = _visible(s, r, x.device)  # [S, E]
            mask = visible.expand(b, -1, -1)
            if spec.attn is AttnKind.CSA:
                rope = (cos, sin, ecos, esin)
                mask, aux = self._select(
                    attn.indexer, x, qr, rope, comp_logits, visible, sparse, want_kl, want_recall
                )
            parts.append(comp_logits.masked_fill(~mask.unsqueeze(2), float("-inf")))
        parts.append(attn.attn_sink.to(parts[0].dtype).expand(b, s, n_heads).unsqueeze(-1))
        probs = torch.cat(parts, dim=-1).float().softmax(dim=-1).to(q.dtype)
        p_win = probs[..., : 2 * w].reshape(b, nb, w, n_heads, 2 * w)
        o = torch.einsum("bnqhk,bnkd->bnqhd", p_win, win_keys).reshape(b, s, n_heads, d)
        if entries is not None:
            p_comp = probs[..., 2 * w : -1]
            o = o + torch.einsum("bshe,bed->bshd", p_comp, entries)
        o = _rope(o, cos, sin, inverse=True)
        return grouped_output_proj(o.flatten(0, 1), attn.wo_a.weight, attn.wo_b.weight), aux

    def _select(self, indexer, x, qr, rope, comp_logits, visible, sparse, want_kl, want_recall):
        """Mask [B, S, E] of the entries each query attends to on a c4 layer, and the indexer's
        loss / recall."""
        cfg = self.cfg
        aux: dict = {}
        need_scores = sparse or want_kl or want_recall
        if not need_scores:
            return visible.expand(x.shape[0], -1, -1), aux
        with torch.set_grad_enabled(want_kl and torch.is_grad_enabled()):
            scores = _index_scores(indexer, cfg, x.detach(), qr.detach(), *rope)
        scores = scores.masked_fill(~visible, float("-inf"))  # [B, S, E]
        k = min(cfg.index_topk, scores.shape[-1])
        picks = scores.detach().topk(k, dim=-1).indices  # [B, S, k]
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picks, True) & visible
        if want_kl or want_recall:
            with torch.no_grad():  # main attention's mass over the visible entries
                p = comp_logits.float().masked_fill(~visible.unsqueeze(1), float("-inf"))
                p = p.softmax(dim=-1).nan_to_num(0.0).mean(dim=2)  # [B, S, E]
            if want_kl:  # rows that see >= 2 entries (an all -inf row has NaN gradients)
                rows = visible.sum(-1) >= 2  # [S]
                p_rows = p[:, rows]
                logq = scores[:, rows].log_softmax(dim=-1).masked_fill(~visible[rows], 0.0)
                aux["kl"] = (torch.xlogy(p_rows, p_rows) - p_rows * logq).sum(-1).mean()
            if want_recall:
                many = visible.sum(-1) > k  # [S]
                dense_top = p.topk(k, dim=-1).indices
                top_mask = torch.zeros_like(chosen).scatter_(-1, dense_top, True)
                set_recall = (top_mask & chosen).sum(-1).float() / k
                mass = (p * chosen).sum(-1)
                aux["recall"] = torch.stack(
                    [set_recall[:, many].mean(), mass[:, many].mean(), many.sum().float()]
                )
        return (chosen if sparse else visible.expand(x.shape[0], -1, -1)), aux

    def _moe(self, block: _Block, x: torch.Tensor, ids: torch.Tensor):
        """``x`` [N, d] (normed) -> ([N, d], per-expert token counts of a scored layer or None)."""
        cfg, ffn = self.cfg, block.ffn
        scores = route_scores(x, ffn.gate.weight, cfg.scoring_func)  # [N, E] fp32
        if block.spec.hash_moe:
            chosen, load = ffn.gate.tid2eid[ids], None
        else:
            chosen = torch.topk(scores + ffn.gate.bias, cfg.n_experts_per_tok, dim=-1).indices
            load = torch.bincount(chosen.flatten(), minlength=cfg.n_routed_experts)
        weights = route_weights(scores, chosen, cfg.routed_scaling_factor)  # [N, k]
        mix = torch.zeros_like(scores).scatter_add(1, chosen, weights)  # [N, E]
        w1 = torch.stack([e.w1.weight for e in ffn.experts])  # [E, I, d]
        w3 = torch.stack([e.w3.weight for e in ffn.experts])
        w2 = torch.stack([e.w2.weight for e in ffn.experts])  # [E, d, I]
        limit = cfg.swiglu_limit
        gate = torch.einsum("nd,eid->nei", x, w1).clamp(max=limit)
        up = torch.einsum("nd,eid->nei", x, w3).clamp(min=-limit, max=limit)
        act = F.silu(gate) * up * mix.to(gate.dtype).unsqueeze(-1)  # weight before w2
        y = torch.einsum("nei,edi->nd", act, w2)
        if cfg.n_shared_experts:
            se = ffn.shared_experts
            shared_gate = se.w1(x).clamp(max=limit)
            y = y + se.w2(F.silu(shared_gate) * se.w3(x).clamp(min=-limit, max=limit))
        return y.to(x.dtype), load


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """``apply_rope`` over [B, S, ..., D] with ``cos``/``sin`` [S, rd/2]."""
    b, s = x.shape[:2]
    flat = x.reshape(b * s, *x.shape[2:])
    return apply_rope(flat, cos.repeat(b, 1), sin.repeat(b, 1), inverse).view(x.shape)


def _window_mask(nb: int, w: int, device) -> torch.Tensor:
    """[nb, W, 2W]: query ``i`` of block ``n`` sees key ``k`` of (block n-1 | block n) iff
    ``0 <= (W + i) - k < W`` and the key exists (block 0 has no predecessor)."""
    i = torch.arange(w, device=device).view(w, 1)
    k = torch.arange(2 * w, device=device).view(1, 2 * w)
    ok = (k > i) & (k <= w + i)
    first = ok & (k >= w)
    return torch.cat([first.unsqueeze(0), ok.unsqueeze(0).expand(nb - 1, -1, -1)])


def _visible(s: int, ratio: int, device) -> torch.Tensor:
    """[S, S // ratio]: entry ``e`` is visible to the query at ``t`` iff ``e < (t+1) // ratio``."""
    t = torch.arange(s, device=device).view(s, 1)
    e = torch.arange(s // ratio, device=device).view(1, -1)
    return e < (t + 1) // ratio


@torch.no_grad()
def init_weights(model: TrainDSV4, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) matrices (output projections scaled by 1/sqrt(2 * layers)), unit norms,
    zero sinks / ape / mHC bases / router bias, and a random ``tid2eid`` (distinct experts per
    token)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * cfg.num_layers)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "_scale")):
            p.fill_(1.0)
        elif name.endswith(("attn_sink", ".ape", "_base")):
            p.zero_()
        else:
            sd = out_std if name.endswith(("wo_b.weight", "w2.weight")) else std
            p.copy_(torch.randn(p.shape, generator=g) * sd)
    for name, buf in model.named_buffers():
        if name.endswith("gate.bias"):
            buf.zero_()
        elif name.endswith("tid2eid"):
            rows = [torch.randperm(cfg.n_routed_experts, generator=g) for _ in range(buf.shape[0])]
            buf.copy_(torch.stack(rows)[:, : buf.shape[1]])


def export_state_dict(model: TrainDSV4) -> dict[str, torch.Tensor]:
    """Released names and dtypes (the table's :class:`~sglang_dsv4.params.Store`): fp32 for
    sinks, ape, mHC and router bias, int64 ``tid2eid``, bf16 for every other tensor."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if t.dtype.is_floating_point:
            t = t.float() if store_of(name) is Store.FP32 else t.to(torch.bfloat16)
        out[name] = t.contiguous()
    return out
