"""The SGLang attention backend of DSV4 (registered as ``dsv4_plugin`` by the plugin).

SGLang calls ``init_forward_metadata`` once per batch, split as SGLang 0.5.17 wants for CUDA
graphs: host work in ``init_forward_metadata_out_graph`` (runs before every replay too), static-
shape device work in ``init_forward_metadata_in_graph`` (recorded into the graph).

* extend batches: the host builds the batch plan and hands it to one wrapper per layer kind
  (``plan()``), whose ``run()`` the layers call;
* decode batches: the device builds :class:`DecodeMeta` (``attention.decode``) from SGLang's
  graph-static buffers, and every layer runs ``decode_attention``; this is what a captured
  decode graph replays.

Layers call :meth:`DSV4AttnBackend.run`, which picks one of the two per batch (a host decision
made once per forward, not per tensor value).
"""

import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_dsv4.attention.decode import DecodeMeta, build_decode_meta, decode_attention
from sglang_dsv4.attention.extend_ops import extend_ops
from sglang_dsv4.attention.plan import BatchPlan, plan_batch
from sglang_dsv4.attention.wrappers import CSAWrapper, HCAWrapper, SWAWrapper
from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.pools import DSV4KVPool

__all__ = ["BACKEND_NAME", "DSV4AttnBackend"]

BACKEND_NAME = "dsv4_plugin"

logger = logging.getLogger(__name__)


class DSV4AttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, DSV4KVPool):
            raise TypeError(
                f"the {BACKEND_NAME} backend needs the DSV4 pools, got {type(pool).__name__}"
            )
        self.token_to_kv_pool = pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        window = pool.schema.sliding_window
        cfg = model_runner.model.cfg
        self._heads, self._index_topk = cfg.num_heads, cfg.index_topk
        self._use_kernels = pool.device != "cpu" and pool.dtype == torch.bfloat16

        def ops(ratio: int):
            return extend_ops(
                ratio,
                window=window,
                n_heads=cfg.num_heads,
                head_dim=pool.schema.head_dim,
                index_heads=cfg.index_n_heads,
                index_head_dim=cfg.index_head_dim,
                topk=cfg.index_topk,
                row_dtype=pool.dtype,
                device=pool.device,
                kernels=pool.device != "cpu",
                norm_eps=cfg.norm_eps,
            )

        self.wrappers = {
            AttnKind.SWA: SWAWrapper(window, ops(0)),
            AttnKind.CSA: CSAWrapper(window, ops(4), topk=cfg.index_topk),
            AttnKind.HCA: HCAWrapper(window, ops(128)),
        }
        self.plan: BatchPlan | None = None
        self.decode_meta: DecodeMeta | None = None
        self._decode_pages = 0  # pages per request in the decode metadata
        self._graph_pages = 0  # ... fixed for captured graphs (the context length)
        self._graph_bs = 0
        self.decode_kernels: dict = {}  # AttnKind -> planned SparseMQA (GPU, bf16 rows)
        self._graph_kernels: dict[int, dict] = {}
        self._context_len = model_runner.model_config.context_len
        allocator = model_runner.token_to_kv_pool_allocator
        model = model_runner.model
        # One line that says which classes serve (the plugin test reads it from the server log).
        logger.info(
            "sglang-dsv4 active: model=%s.%s backend=%s pool=%s allocator=%s.%s",
            type(model).__module__,
            type(model).__name__,
            type(self).__name__,
            type(pool).__name__,
            type(allocator).__module__,
            type(allocator).__name__,
        )

    def init_forward_metadata(self, forward_batch) -> None:
        self.init_forward_metadata_out_graph(forward_batch)
        self.init_forward_metadata_in_graph(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        fb = forward_batch
        self.plan = self.decode_meta = None
        if fb.forward_mode.is_idle():
            return
        if fb.forward_mode.is_decode():
            bs = fb.seq_lens_cpu.numel()
            replay = not in_capture and self._graph_pages and bs <= self._graph_bs
            if not in_capture:
                self._note_decode(fb)
            if in_capture or replay:
                self._decode_pages = self._graph_pages
            else:
                self._decode_pages = -(-int(fb.seq_lens_cpu.max()) // self._block)
            if in_capture:  # the captured graph keeps these buffers: one plan per graph size
                self.decode_kernels = self._graph_kernels[bs] = self._plan_kernels(bs)
            elif replay:
                self.decode_kernels = self._graph_kernels.get(bs, {})
            else:
                self.decode_kernels = self._plan_kernels(bs)
            return
        self.plan = plan_batch(fb, self.token_to_kv_pool, self.req_to_token_pool)
        for wrapper in self.wrappers.values():
            wrapper.plan(self.plan)

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        fb = forward_batch
        if not fb.forward_mode.is_decode():
            return
        pool = self.token_to_kv_pool
        self.decode_meta = build_decode_meta(
            fb.req_pool_indices,
            fb.positions,
            fb.out_cache_loc,
            self.req_to_token_pool.req_to_token,
            pool.full_to_swa_index_mapping,
            pool.spare_tail_row,
            pool.schema.sliding_window,
            self._block,
            self._decode_pages,
        )

    def _new_kernel(self):
        """A sparse MQA kernel over bf16 rows (GPU), or None: the ``ref`` math runs."""
        if not self._use_kernels:
            return None
        from sglang_dsv4.kernels.attention import SparseMQA

        pool = self.token_to_kv_pool
        return SparseMQA(self._heads, pool.schema.head_dim, kv_fp8=False, device=pool.device)

    def _plan_kernels(self, bs: int) -> dict:
        """Sparse MQA plans of a decode batch: every kind attends its ``swa_window``; c128 adds
        every entry of ``pages`` blocks, c4 its top-k."""
        if not self._use_kernels:
            return {}
        schema = self.token_to_kv_pool.schema
        window, pages = schema.sliding_window, self._decode_pages
        extra = {AttnKind.SWA: 0, AttnKind.HCA: pages, AttnKind.CSA: 0}
        csa = schema.layers_of(AttnKind.CSA)
        if csa:
            extra[AttnKind.CSA] = min(self._index_topk, pages * csa[0].entries_per_block)
        plans = {}
        for kind, extra_topk in extra.items():
            plans[kind] = self._new_kernel()
            plans[kind].plan(bs, window, extra_topk)
        return plans

    def _note_decode(self, fb) -> None:
        """Host bookkeeping of tail progress (an extend of the same owner may follow in mixed
        batches); decode never changes a tail's owner."""
        pool = self.token_to_kv_pool
        slots = fb.req_pool_indices.tolist()
        for slot, seq_len in zip(slots, fb.seq_lens_cpu.tolist(), strict=True):
            pool.tail_pos[slot] = int(seq_len)

    @property
    def _block(self) -> int:
        return self.token_to_kv_pool.schema.block_size

    # CUDA graphs (decode): all per-batch tensors are derived in init_forward_metadata_in_graph.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        self._graph_bs = max_bs
        self._graph_pages = -(-self._context_len // self._block)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def run(self, kind: AttnKind, lk, q, kv, sink, scale: float, comp=None) -> torch.Tensor:
        """One layer's attention over this batch (``q`` [T, H, D], ``kv`` [T, D])."""
        if self.decode_meta is not None:
            kernel = self.decode_kernels.get(kind)
            return decode_attention(lk, self.decode_meta, q, kv, sink, scale, comp, kernel)
        return self.wrappers[kind].run(lk, q, kv, sink, scale, comp)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{BACKEND_NAME} is driven by the DSV4 model's layers through its wrappers; "
            "RadixAttention layers cannot use it"
        )
