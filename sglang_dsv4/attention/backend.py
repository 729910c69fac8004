"""The SGLang attention backend of DSV4 (registered as ``dsv4_plugin`` by the plugin).

SGLang calls ``init_forward_metadata`` once per batch, split as SGLang 0.5.17 wants for CUDA
graphs: host work in ``init_forward_metadata_out_graph`` (runs before every replay too), static-
shape device work in ``init_forward_metadata_in_graph`` (recorded into the graph).

* extend batches: the host builds the batch plan and hands it to one wrapper per layer kind
  (``plan()``), whose ``run()`` the layers call;
* decode batches: the host plans the step's kernels once (``decode_ops.plan``, kept per captured
  graph size), the device builds :class:`DecodeMeta` (``attention.decode``) from SGLang's
  graph-static buffers and advances the tails' progress (``pool.tail_pos``), and every layer
  runs ``decode_ops.run``; this is what a captured decode graph replays. The decode ops are
  chosen once here: GPU kernels (``attention.decode_kernels``) for FP8 / bf16 rows on the GPU,
  the torch twin (``attention.decode.DecodeTorch``) otherwise.

Layers call :meth:`DSV4AttnBackend.run`, which picks one of the two per batch (a host decision
made once per forward, not per tensor value).
"""

import logging
from functools import partial

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_dsv4.attention.decode import DecodeMeta, KVNorm, decode_ops
from sglang_dsv4.attention.extend_ops import extend_ops
from sglang_dsv4.attention.plan import BatchPlan, plan_batch
from sglang_dsv4.attention.plan_tables import tables_builder
from sglang_dsv4.attention.speculative import (
    VerifyJournal,
    verify_metadata,
    verify_ops,
    verify_tokens,
)
from sglang_dsv4.attention.wrappers import CSAWrapper, HCAWrapper, SWAWrapper
from sglang_dsv4.config import AttnKind
from sglang_dsv4.mem.pools import DSV4KVPool
from sglang_dsv4.mem.schema import EntryFormat
from sglang_dsv4.mem.sizing import verify_width

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
        self._use_kernels = pool.device != "cpu" and pool.schema.fmt is not EntryFormat.FP32

        def ops(kind: AttnKind):
            return extend_ops(
                kind.value,
                _first_layer(pool, kind),
                window=window,
                n_heads=cfg.num_heads,
                index_heads=cfg.index_n_heads,
                topk=cfg.index_topk,
                device=pool.device,
                kernels=self._use_kernels,
                norm_eps=cfg.norm_eps,
            )

        self.wrappers = {
            AttnKind.SWA: SWAWrapper(window, ops(AttnKind.SWA)),
            AttnKind.CSA: CSAWrapper(window, ops(AttnKind.CSA), topk=cfg.index_topk),
            AttnKind.HCA: HCAWrapper(window, ops(AttnKind.HCA)),
        }
        self.decode_ops = decode_ops(
            pool, cfg.num_heads, cfg.index_topk, cfg.index_n_heads, kernels=self._use_kernels
        )
        self.plan: BatchPlan | None = None
        self._tables = tables_builder(self._use_kernels)  # the extend plan's device half
        # target verify: the rejected tokens' tails undone (attention.speculative)
        # (its memory: reserved by the pool sizing, mem.sizing, from the same width)
        width = verify_width(model_runner.server_args, model_runner.is_draft_worker)
        self.journal = VerifyJournal(pool, width)
        self._verify_ops = None  # built at the first verify batch (attention.speculative)
        self._ops = self.decode_ops  # the ops of this batch's static-shape step
        self.decode_meta: DecodeMeta | None = None
        self.decode_plan = None  # the step's planned decode kernels
        self._decode_pages = 0  # pages per request in the decode metadata
        self._graph_pages = 0  # ... fixed for captured graphs (the context length)
        self._graph_bs = 0
        self._graph_plans: dict = {}  # graph batch size -> its decode plan (kept alive)
        # SGLang's verify-input build may size by it; the graphs' pages come from it
        self.max_context_len = model_runner.model_config.context_len
        allocator = model_runner.token_to_kv_pool_allocator
        model = model_runner.model
        # One line that says which classes serve (the plugin test reads it from the server log).
        logger.info(
            "sglang-dsv4 active: model=%s.%s backend=%s pool=%s allocator=%s.%s rows=%s "
            "index_keys=%s decode=%s",
            type(model).__module__,
            type(model).__name__,
            type(self).__name__,
            type(pool).__name__,
            type(allocator).__module__,
            type(allocator).__name__,
            pool.schema.fmt.value,
            pool.schema.index_fmt.value,
            type(self.decode_ops).__name__,
        )

    def init_forward_metadata(self, forward_batch) -> None:
        """An eager forward (SGLang's model runner): plan for this batch, never a graph's."""
        self._prepare(forward_batch, in_capture=False, replay=False)
        self.init_forward_metadata_in_graph(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """SGLang's graph runner: before a capture, or before a replay (the graph's batch size)."""
        self._prepare(forward_batch, in_capture, replay=not in_capture)

    def _prepare(self, forward_batch, in_capture: bool, replay: bool) -> None:
        fb = forward_batch
        self.plan = self.decode_meta = None
        self._ops = self.decode_ops
        if fb.forward_mode.is_idle():
            return
        if fb.forward_mode.is_decode():
            bs = fb.seq_lens_cpu.numel()
            self._plan_step(fb, bs, 0, in_capture, replay, partial(self._plan_decode, bs))
            return
        if fb.forward_mode.is_target_verify():  # a static-shape step of bs * n rows
            bs, n = fb.batch_size, verify_tokens(fb)
            if self._verify_ops is None:
                self._verify_ops = verify_ops(self.decode_ops, self.journal)
            self._ops = self._verify_ops
            make = partial(self._plan_verify, bs, n)
            self._plan_step(fb, ("verify", bs), n, in_capture, replay, make)
            return
        pool, rtp = self.token_to_kv_pool, self.req_to_token_pool
        rows = self.journal.commit_rows if self.journal.tails else None
        self.plan = plan_batch(fb, pool, rtp, commit=self.journal.commit, commit_rows=rows,
                               tables=self._tables)  # fmt: skip
        self.journal.forget(self.plan.tables.req_slots)  # the plan resumed what it keeps
        for wrapper in self.wrappers.values():
            wrapper.plan(self.plan)

    def _plan_step(self, fb, key, ahead: int, in_capture, replay, make) -> None:
        """Host work of a static-shape step (decode, verify, draft decode): its pages (the
        context under a graph, else the batch's longest ``seq_lens + ahead``) and its planned
        kernels, kept per graph ``key`` for captured graphs, which replay their own."""
        replay = replay and bool(self._graph_pages)
        if in_capture or replay:
            self._decode_pages = self._graph_pages
        else:
            self._decode_pages = -(-(int(fb.seq_lens_cpu.max()) + ahead) // self._block)
        if in_capture:  # the captured graph keeps these buffers: one plan per graph size
            self.decode_plan = self._graph_plans[key] = make()
        elif replay:  # the graph replays its own plan; run() is not called
            self.decode_plan = self._graph_plans.get(key)
        else:
            self.decode_plan = make()

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        fb = forward_batch
        if fb.forward_mode.is_decode():
            self._decode_meta(fb, fb.positions, fb.out_cache_loc)
        elif fb.forward_mode.is_target_verify():  # commit the last verify, journal this one
            self.decode_meta = verify_metadata(
                self.journal, self._ops, fb, self.req_to_token_pool.req_to_token,
                n=verify_tokens(fb), n_pages=self._decode_pages,
            )  # fmt: skip

    def plan_step(self, fb, step: int, in_capture: bool = False, replay: bool = False) -> None:
        """Draft decode step ``step`` (:class:`~sglang_dsv4.attention.speculative.
        DraftDecodeSteps`), host work: the batch's tokens sit at ``positions + step``."""
        self.plan = None
        self._ops = self.decode_ops
        bs = fb.batch_size
        self._plan_step(fb, bs, step + 1, in_capture, replay, partial(self._plan_decode, bs))

    def step_metadata(self, fb, positions, out_cache_loc) -> None:
        """Draft decode step, device work: the requests at ``positions`` [B] writing
        ``out_cache_loc`` [B]."""
        self._decode_meta(fb, positions, out_cache_loc)

    def _decode_meta(self, fb, positions, out_cache_loc) -> None:
        pool = self.token_to_kv_pool
        # one launch on the GPU; it also advances the tails' progress on the device
        self.decode_meta = self.decode_ops.build_meta(
            fb.req_pool_indices,
            positions,
            out_cache_loc,
            self.req_to_token_pool.req_to_token,
            pool.full_to_swa_index_mapping,
            pool.spare_tail_row,
            pool.tail_pos,
            window=pool.schema.sliding_window,
            block=self._block,
            n_pages=self._decode_pages,
        )

    def _plan_decode(self, bs: int):
        plan = self.decode_ops.plan(bs, self._decode_pages)
        choice = getattr(plan, "choice", None)
        if choice:
            logger.debug("dsv4 decode bs=%d pages=%d attention %s", bs, self._decode_pages, choice)
        return plan

    def _plan_verify(self, bs: int, n: int):
        return self._ops.plan_verify(bs, n, self._decode_pages)

    @property
    def _block(self) -> int:
        return self.token_to_kv_pool.schema.block_size

    # CUDA graphs (decode): all per-batch tensors are derived in init_forward_metadata_in_graph.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        self._graph_bs = max_bs
        self._graph_pages = -(-self.max_context_len // self._block)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def on_after_cuda_graph_warmup(self) -> None:
        """SGLang runs a graph's forward once eagerly, calls this, then captures."""
        if self.decode_plan is not None:
            self._ops.after_warmup(self.decode_plan)

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs) -> None:
        """With SGLang's overlap plan stream: nothing to redo, a verify's device metadata is
        built inside its forward (``init_forward_metadata_in_graph``) from the batch's tensors."""

    def run(
        self,
        kind: AttnKind,
        lk,
        q,
        kv,
        sink,
        scale: float,
        comp=None,
        kv_norm: KVNorm | None = None,
    ) -> torch.Tensor:
        """One layer's attention over this batch (``q`` [T, H, D], ``kv`` [T, D]: the raw
        ``wkv(x)`` with ``kv_norm``, which the KV store then applies, else normed and roped)."""
        if self.decode_meta is not None:  # decode or verify: the step's ops
            meta, plan = self.decode_meta, self.decode_plan
            return self._ops.run(plan, kind, lk, meta, q, kv, sink, scale, comp, kv_norm)
        return self.wrappers[kind].run(lk, q, kv, sink, scale, comp, kv_norm)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{BACKEND_NAME} is driven by the DSV4 model's layers through its wrappers; "
            "RadixAttention layers cannot use it"
        )


def _first_layer(pool: DSV4KVPool, kind: AttnKind):
    """A layer of ``kind`` (its row formats are the kind's), or None if the model has none."""
    layers = pool.schema.layers_of(kind)
    return pool.layer(layers[0].layer) if layers else None
