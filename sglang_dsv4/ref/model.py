"""Whole-model DSV4 forward composed from the reference ops: one sequence, no cache.

This is the CPU statement of the model that the parity tests hold against HF transformers, and a
test utility for everything built later (serving model, kernels, prefix cache): they reuse the
same ops, so a disagreement points at the new code. Weights use the released tensor names
(see :mod:`sglang_dsv4.checkpoint`). Every weight product goes through
:func:`~sglang_dsv4.ref.linear.linear`, so a linear weight may also be a quantized-linear module
(the served model's GPU path); the routed experts of a layer are one callable (``experts``).
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from sglang_dsv4.config import AttnKind, DSV4Config, LayerSpec
from sglang_dsv4.params import model_specs
from sglang_dsv4.ref.attention import grouped_output_proj, sparse_attention, window_indices
from sglang_dsv4.ref.compressor import CompressorState, CompressorWeights, compress
from sglang_dsv4.ref.indexer import index_scores, index_topk
from sglang_dsv4.ref.linear import Weight, linear
from sglang_dsv4.ref.mhc import hc_head, hc_post, hc_pre
from sglang_dsv4.ref.moe import (
    DenseExperts,
    route_hash,
    route_scores,
    route_topk,
    route_weights,
    swiglu,
)
from sglang_dsv4.ref.norm import rms_norm
from sglang_dsv4.ref.quant import fp4_e2m1_fake_quant, hadamard, kv_fake_quant
from sglang_dsv4.ref.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["RefDSV4", "RefOptions", "RoutedExperts"]

RoutedExperts = Callable[..., torch.Tensor]
"""``routed(x [T, d], chosen [T, k], weights [T, k], limit, dense) -> [T, d]``: the weighted sum
of a layer's routed experts (:class:`~sglang_dsv4.ref.moe.DenseExperts` or a grouped kernel)."""

_ROUTED = re.compile(r"layers\.(\d+)\.ffn\.experts\.\d+\.")


@dataclass(frozen=True)
class RefOptions:
    """``quant_sim``: FP8 KV and Hadamard + FP4 indexer rounding as in the official forward."""

    quant_sim: bool = False


class RefDSV4:
    """``RefDSV4(cfg, weights)(ids [S]) -> logits [S, vocab]`` in the weights' dtype.

    ``weights``: released name -> tensor; a linear weight may instead be a quantized-linear
    module (called by :func:`~sglang_dsv4.ref.linear.linear`). ``experts``: layer index -> its
    routed experts as one callable, replacing (and not requiring) that layer's per-expert
    weights; the other layers get :class:`~sglang_dsv4.ref.moe.DenseExperts` over ``weights``."""

    def __init__(
        self,
        cfg: DSV4Config,
        weights: Mapping[str, Weight],
        options: RefOptions | None = None,
        experts: Mapping[int, RoutedExperts] | None = None,
    ):
        self.cfg = cfg
        self.w = weights
        self.options = options or RefOptions()
        given = dict(experts or {})
        missing = [
            n
            for n in self.required_names()
            if n not in weights and not ((m := _ROUTED.match(n)) and int(m[1]) in given)
        ]
        if missing:
            raise KeyError(f"{len(missing)} tensors missing from the weights, e.g. {missing[:5]}")
        # on the weights' device: a host -> device copy per call cannot be graph-captured
        device = weights["embed.weight"].device
        self.inv_freq = {
            s.index: rope_inv_freq(s.rope, cfg.rope_dim).to(device) for s in cfg.layers
        }
        self.experts: dict[int, RoutedExperts] = {
            s.index: given[s.index] if s.index in given else self._dense_experts(s.index)
            for s in cfg.layers
        }

    def _dense_experts(self, layer: int) -> DenseExperts:
        """The layer's routed experts over per-expert lists of ``weights`` (no copies)."""
        n = self.cfg.n_routed_experts
        p = f"layers.{layer}.ffn.experts."
        return DenseExperts(
            *([self.w[f"{p}{e}.{k}.weight"] for e in range(n)] for k in ("w1", "w2", "w3"))
        )

    def required_names(self) -> list[str]:
        """The main model's tensors (:func:`sglang_dsv4.params.model_specs`)."""
        return list(model_specs(self.cfg))

    def compressor_weights(self, layer: int, which: str = "compressor") -> CompressorWeights:
        p = f"layers.{layer}.attn.{which}."
        w = self.w
        return CompressorWeights(
            w[p + "wkv.weight"], w[p + "wgate.weight"], w[p + "ape"], w[p + "norm.weight"]
        )

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return linear(self.final_hidden(self.streams(ids)), self.w["head.weight"])

    @torch.no_grad()
    def streams(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [S] -> the residual streams after the last layer [S, hc, d] (what the head
        reads through ``final_hidden``, and what an MTP layer reads: :mod:`sglang_dsv4.ref.mtp`)."""
        return self.blocks(self.embed_streams(ids), ids)

    def blocks(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every layer over a whole sequence from positions 0: streams ``x`` [S, hc, d] of
        tokens ``ids`` [S] -> streams [S, hc, d]."""
        cfg, w = self.cfg, self.w
        positions = torch.arange(ids.shape[0], device=ids.device)
        for spec in cfg.layers:
            p = f"layers.{spec.index}."
            u, post, comb = self.hc_pre(x, p + "hc_attn_")
            y = self.attention(
                spec, rms_norm(u, w[p + "attn_norm.weight"], cfg.norm_eps), positions
            )
            x = hc_post(y, x, post, comb)
            u, post, comb = self.hc_pre(x, p + "hc_ffn_")
            y = self.ffn(spec, rms_norm(u, w[p + "ffn_norm.weight"], cfg.norm_eps), ids)
            x = hc_post(y, x, post, comb)
        return x

    def embed_streams(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> ``hc_mult`` identical residual streams [T, hc, d]."""
        h = self.w["embed.weight"][ids]
        return h.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Streams [T, hc, d] -> the normed hidden state the head reads [T, d]."""
        cfg, w = self.cfg, self.w
        u = hc_head(
            x, w["hc_head_fn"], w["hc_head_base"], w["hc_head_scale"], cfg.hc_eps, cfg.norm_eps
        )
        return rms_norm(u, w["norm.weight"], cfg.norm_eps)

    def hc_pre(self, x: torch.Tensor, prefix: str):
        cfg, w = self.cfg, self.w
        return hc_pre(
            x,
            w[prefix + "fn"],
            w[prefix + "base"],
            w[prefix + "scale"],
            cfg.hc_sinkhorn_iters,
            cfg.hc_eps,
            cfg.norm_eps,
        )

    def project(self, spec: LayerSpec, x: torch.Tensor, positions: torch.Tensor):
        """Attention input ``x`` [T, d] -> (qr [T, q_lora], roped q [T, H, D], roped kv [T, D])."""
        cfg, w = self.cfg, self.w
        p = f"layers.{spec.index}.attn."
        cos, sin = rope_cos_sin(positions, self.inv_freq[spec.index])
        qr = rms_norm(linear(x, w[p + "wq_a.weight"]), w[p + "q_norm.weight"], cfg.norm_eps)
        q = linear(qr, w[p + "wq_b.weight"]).view(x.shape[0], cfg.num_heads, cfg.head_dim)
        q = apply_rope(rms_norm(q, None, cfg.norm_eps), cos, sin)
        kv = linear(x, w[p + "wkv.weight"])
        kv = apply_rope(rms_norm(kv, w[p + "kv_norm.weight"], cfg.norm_eps), cos, sin)
        return qr, q, self._kv_quant(kv)

    def output(self, spec: LayerSpec, o: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention output [T, H, D] -> inverse RoPE at the query position, grouped projection."""
        p = f"layers.{spec.index}.attn."
        cos, sin = rope_cos_sin(positions, self.inv_freq[spec.index])
        o = apply_rope(o, cos, sin, inverse=True)
        return grouped_output_proj(o, self.w[p + "wo_a.weight"], self.w[p + "wo_b.weight"])

    def indexer_query(
        self, spec: LayerSpec, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor
    ):
        """(roped indexer queries [T, Hi, Di], raw head weights [T, Hi]) of a c4 layer."""
        cfg, w = self.cfg, self.w
        p = f"layers.{spec.index}.attn.indexer."
        cos, sin = rope_cos_sin(positions, self.inv_freq[spec.index])
        q = linear(qr, w[p + "wq_b.weight"])
        q = q.view(x.shape[0], cfg.index_n_heads, cfg.index_head_dim)
        q = apply_rope(q, cos, sin)
        if self.options.quant_sim:
            q = fp4_e2m1_fake_quant(hadamard(q))
        return q, linear(x, w[p + "weights_proj.weight"])

    def attention(self, spec: LayerSpec, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention block of one layer over a whole sequence: ``x`` [S, d] -> [S, d]."""
        cfg, w = self.cfg, self.w
        n = x.shape[0]
        qr, q, kv = self.project(spec, x, positions)
        indices = window_indices(positions, cfg.sliding_window)  # [S, W] rows of kv
        if spec.attn.compressed:
            entries = self._kv_quant(self._compress_all(spec, x, "compressor"))  # [E, D]
            if spec.attn is AttnKind.CSA:
                picks = self.indexer(spec, x, qr, positions)  # [S, k]
            else:
                visible = (positions + 1) // spec.ratio
                picks = torch.arange(entries.shape[0], device=x.device).expand(n, -1)
                picks = torch.where(picks < visible.unsqueeze(1), picks, -1)
            indices = torch.cat([indices, torch.where(picks >= 0, picks + n, -1)], dim=1)
            kv = torch.cat([kv, entries])
        o = sparse_attention(
            q, kv, indices, w[f"layers.{spec.index}.attn.attn_sink"], cfg.head_dim**-0.5
        )
        return self.output(spec, o, positions)

    def indexer(
        self, spec: LayerSpec, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Top-k entry indices [S, min(topk, E)] (-1 = none) of a c4 layer."""
        keys = self._compress_all(spec, x, "indexer.compressor")  # [E, Di]
        if self.options.quant_sim:
            keys = fp4_e2m1_fake_quant(hadamard(keys))
        q, weights = self.indexer_query(spec, x, qr, positions)
        return index_topk(
            index_scores(q, weights, keys), positions, spec.ratio, self.cfg.index_topk
        )

    def _compress_all(self, spec: LayerSpec, x: torch.Tensor, which: str) -> torch.Tensor:
        cw = self.compressor_weights(spec.index, which)
        state = CompressorState.empty(cw, x.device)
        entries, _, _ = compress(x, 0, state, cw, self.inv_freq[spec.index], self.cfg.norm_eps)
        return entries.to(x.dtype)

    def _kv_quant(self, kv: torch.Tensor) -> torch.Tensor:
        return kv_fake_quant(kv, self.cfg.rope_dim) if self.options.quant_sim else kv

    def ffn(
        self, spec: LayerSpec, x: torch.Tensor, ids: torch.Tensor, graph_safe: bool = False
    ) -> torch.Tensor:
        """MoE block: ``x`` [S, d] -> [S, d]. ``graph_safe`` runs every expert on every token
        (no data-dependent shapes, for captured decode graphs)."""
        cfg, w = self.cfg, self.w
        p = f"layers.{spec.index}.ffn."
        scores = route_scores(x, w[p + "gate.weight"], cfg.scoring_func)
        if spec.hash_moe:
            chosen = route_hash(ids, w[p + "gate.tid2eid"])
        else:
            chosen = route_topk(scores, w[p + "gate.bias"], cfg.n_experts_per_tok)
        weights = route_weights(scores, chosen, cfg.routed_scaling_factor)
        out = self.experts[spec.index](x, chosen, weights, cfg.swiglu_limit, dense=graph_safe)
        if cfg.n_shared_experts:
            shared = (w[p + f"shared_experts.{k}.weight"] for k in ("w1", "w2", "w3"))
            out = out + swiglu(x, *shared, cfg.swiglu_limit)
        return out
