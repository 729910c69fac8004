"""Pools + SGLang-shaped request bookkeeping for attention-path tests (tests/attention)."""

from types import SimpleNamespace

import torch

from sglang_dsv4.attention.extend_ops import extend_ops
from sglang_dsv4.attention.wrappers import (
    CompressedInputs,
    CSAWrapper,
    HCAWrapper,
    IndexerInputs,
    SWAWrapper,
)
from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.pools import DSV4KVPool
from sglang_dsv4.mem.schema import CacheSchema, EntryFormat
from sglang_dsv4.ref.compressor import CompressorWeights
from sglang_dsv4.ref.rope import rope_inv_freq

BLOCK = 128
PAGES = 24
LENGTHS = [127, 128, 131, 0, 255, 300]  # prefix before the decode token


def compressor(w, layer: int, which: str) -> CompressorWeights:
    p = f"layers.{layer}.attn.{which}."
    return CompressorWeights(
        w[p + "wkv.weight"], w[p + "wgate.weight"], w[p + "ape"], w[p + "norm.weight"]
    )


class World:
    """Pools + SGLang-shaped request bookkeeping for a handful of requests."""

    def __init__(self, cfg, device: str = "cpu", dtype=torch.float32, fmt=None, index_fmt=None):
        fmt = fmt or (EntryFormat.FP32 if dtype == torch.float32 else EntryFormat.BF16)
        schema = CacheSchema.from_config(cfg, fmt, index_fmt)
        n = PAGES * BLOCK
        self.pool = DSV4KVPool(schema, n, n, len(LENGTHS), dtype, device)
        # full page p -> swa page (p * 7) % PAGES + 1: never the identity, never page 0
        full = torch.arange(n + BLOCK)
        swa = ((full // BLOCK * 7) % PAGES + 1) * BLOCK + full % BLOCK
        mapping = torch.cat([torch.where(full >= BLOCK, swa, 0), torch.tensor([-1])])
        self.pool.register_mapping(mapping.to(device))
        self.req_to_token = torch.zeros(len(LENGTHS), 1024, dtype=torch.int32)
        page = iter(range(1, PAGES + 1))
        for r in range(len(LENGTHS)):  # 3 pages per request, deliberately not in order
            pages = [next(page) for _ in range(3)][::-1]
            slots = torch.cat([torch.arange(p * BLOCK, (p + 1) * BLOCK) for p in pages])
            self.req_to_token[r, : slots.numel()] = slots
        self.req_to_token = self.req_to_token.to(device)
        self.rtp = SimpleNamespace(
            req_to_token=self.req_to_token, req_generation=torch.ones(len(LENGTHS))
        )

    def batch(self, reqs: list[int], prefix: list[int], seq: list[int], decode: bool):
        rows = [self.req_to_token[r, p:s].long() for r, p, s in zip(reqs, prefix, seq, strict=True)]
        return SimpleNamespace(
            forward_mode=SimpleNamespace(is_decode=lambda: decode, is_target_verify=lambda: False),
            seq_lens_cpu=torch.tensor(seq),
            extend_prefix_lens=torch.tensor(prefix),
            req_pool_indices=torch.tensor(reqs),
            out_cache_loc=torch.cat(rows),
        )


def wrapper(cfg, kind: AttnKind, lk=None, device="cpu", kernels: bool = False):
    """The extend wrapper of ``kind`` with the twin ops, or the Triton kernels (``kernels``) for
    the row formats of layer ``lk``."""
    ops = extend_ops(
        kind.value,
        lk,
        window=cfg.sliding_window,
        n_heads=cfg.num_heads,
        index_heads=cfg.index_n_heads,
        topk=cfg.index_topk,
        device=device,
        kernels=kernels,
        norm_eps=1e-6,
    )
    if kind is AttnKind.CSA:
        return CSAWrapper(cfg.sliding_window, ops, topk=cfg.index_topk)
    return {AttnKind.SWA: SWAWrapper, AttnKind.HCA: HCAWrapper}[kind](cfg.sliding_window, ops)


def inputs(cfg, w, spec, n: int, gen: torch.Generator):
    q = torch.randn(n, cfg.num_heads, cfg.head_dim, generator=gen)
    kv = torch.randn(n, cfg.head_dim, generator=gen)
    if not spec.attn.compressed:
        return q, kv, None
    x = torch.randn(n, cfg.hidden_size, generator=gen)
    ix = None
    if spec.attn is AttnKind.CSA:
        ix = IndexerInputs(
            torch.randn(n, cfg.index_n_heads, cfg.index_head_dim, generator=gen),
            torch.randn(n, cfg.index_n_heads, generator=gen),
            compressor(w, spec.index, "indexer.compressor"),
            cfg.index_topk,
        )
    inv_freq = rope_inv_freq(spec.rope, cfg.rope_dim)
    comp = CompressedInputs(x, compressor(w, spec.index, "compressor"), inv_freq, 1e-6, ix)
    return q, kv, comp


def pool_state(lk) -> dict[str, torch.Tensor]:
    out = {"raw": lk.raw[BLOCK:]}  # swa page 0 is the dummy target
    for name in ("entries", "index_keys"):
        if getattr(lk, name) is not None:
            out[name] = getattr(lk, name)[1:]
    for name in ("tail", "index_tail"):
        if getattr(lk, name) is not None:
            out[name + ".kv"] = getattr(lk, name).kv[:-1]  # the spare row takes padding
            out[name + ".score"] = getattr(lk, name).score[:-1]
    for name in ("boundary", "index_boundary"):
        if getattr(lk, name) is not None:
            out[name + ".kv"] = getattr(lk, name).kv[1:]
            out[name + ".score"] = getattr(lk, name).score[1:]
    return {k: v.clone() for k, v in out.items()}
